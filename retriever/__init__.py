"""retriever/: search. The Retriever protocol, the Tantivy index, the Search-R1 HTTP server and client."""
