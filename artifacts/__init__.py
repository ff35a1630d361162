"""What a compile run hands a user: the artifact (the compiled graph, its manifest and check), and
writing it out: atomic output folders, the report, the Triton repository, memory estimates."""
