"""One screen per pipeline step; each is a Textual mode so its state survives switching."""
