"""`ctxrepro check`: what `dvc repro` would run, the inputs it needs, and the disk and memory it will take,
reported in seconds before a run that may last weeks."""
