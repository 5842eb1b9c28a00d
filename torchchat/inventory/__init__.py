"""Downloaded models: where they live, fetching them (Hugging Face Hub or direct URLs), listing and
removing them.

Layout: `<model-directory>/<registry name>/` holds one model exactly as `build` reads it (HF layout for
hub models; the checkpoint and tokenizer files named in models.json for URL models). A model folder
appears only by an atomic rename of a fully downloaded and verified staging folder under
`<model-directory>/.partial/`, so a folder that exists is complete."""
