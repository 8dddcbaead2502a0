from torchrelay.services.serve.service import main

raise SystemExit(main())
