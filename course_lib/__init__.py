"""course_lib: the library behind "Guided Diffusion, from DDPM to Latent Diffusion".

Importing the package is cheap: each lesson imports the modules it needs
(`from course_lib.diffusion import formulas`). Heavy optional dependencies
(open_clip, triton) are imported inside the modules that use them.
"""

__version__ = "0.1.0"
