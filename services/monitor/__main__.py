from torchrelay.services.monitor.service import main

raise SystemExit(main())
