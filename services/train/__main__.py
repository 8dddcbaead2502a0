from torchrelay.services.train.service import main

raise SystemExit(main())
