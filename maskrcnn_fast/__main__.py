from maskrcnn_fast.cli import main

raise SystemExit(main())
