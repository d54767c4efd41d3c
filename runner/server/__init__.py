"""`t2i-serve`: the web form and JSON job API over the shared core (`runner.run.run`)."""
