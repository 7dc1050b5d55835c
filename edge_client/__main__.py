from edge_client.cli import main

raise SystemExit(main())
