from ctxrepro.cli import main

main()
