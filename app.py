"""The web app: `python app.py`, or the `app_file` of a Hugging Face Space.

Builds the Blocks UI from c2c_core.ui and launches it. Host and port follow gradio's own
settings (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT; 127.0.0.1:7860 by default). The default
models are the offline smollm2-demo pair, or the published Qwen3 pair when SPACE_ID is set.
"""

from c2c_core.ui import build_app, launch_kwargs, preload
from c2c_core.ui.common import space_runtime

demo = build_app()

if __name__ == "__main__":
    # ZeroGPU wants weights created at start-up, outside the @spaces.GPU calls; elsewhere the
    # page is served at once and the models load in the background.
    preload(background=not space_runtime())
    demo.launch(**launch_kwargs())
