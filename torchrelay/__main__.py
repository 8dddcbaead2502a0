from torchrelay.cli import main

raise SystemExit(main())
