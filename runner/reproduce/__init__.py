"""Reading how an image was made (inspect.py: ours or A1111 infotext) and regenerating it (from_image.py)."""
