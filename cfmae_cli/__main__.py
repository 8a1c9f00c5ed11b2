from cfmae_cli.cli import main

main()
