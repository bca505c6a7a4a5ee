"""The web app: `python app.py`, or the `app_file` of a Hugging Face Space.

Builds the Blocks UI from c2c_core.frontends.ui and launches it. Host and port follow gradio's own
settings (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT; 127.0.0.1:7860 by default). The default
models are the offline smollm2-demo pair, or the published Qwen3 pair when SPACE_ID is set.
"""

# The models' worker process (multiprocessing "spawn", c2c_core/frontends/worker.py) imports this file
# again as __mp_main__: it must neither import gradio nor build a second app there.
if __name__ != "__mp_main__":
    # ZeroGPU: `spaces` refuses to import once CUDA is initialised; import it before anything
    # else can touch CUDA (a no-op elsewhere)
    from c2c_core.measure.zerogpu import import_spaces
    import_spaces()
    from c2c_core.frontends.ui import build_app, launch_kwargs, preload
    from c2c_core.frontends.ui.durations import space_runtime

    demo = build_app()

if __name__ == "__main__":
    import os
    import tempfile

    from c2c_core.frontends.ui.gate import bound_output
    # no line the server prints holds more than 2 KB (gradio prints a bad request's values)
    bound_output()
    # Serve from an empty working folder: a client's hub-shaped name (owner/name) can then never
    # be a folder below this one, which transformers or datasets would read from disk.
    os.chdir(tempfile.mkdtemp(prefix="c2c-app-cwd-"))
    # ZeroGPU wants weights created at start-up, outside the @spaces.GPU calls; elsewhere the
    # page is served at once and the models load in the background.
    preload(background=not space_runtime())
    demo.launch(**launch_kwargs())
