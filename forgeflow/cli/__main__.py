from forgeflow.cli.main import main

main()
