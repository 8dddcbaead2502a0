from torchrelay.services.ingest.service import main

raise SystemExit(main())
