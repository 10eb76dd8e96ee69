"""The command line: `refold` commands, the local broker launcher, the demo."""
