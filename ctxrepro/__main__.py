from ctxrepro.cli import main

# Guarded: spawn-based worker processes re-import the main module.
if __name__ == "__main__":
    main()
