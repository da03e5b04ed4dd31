"""DiffusionBlocks for torchtitan: block-wise transformer training.

Importing the package registers with torchtitan 0.2.2:
- train spec `dblocks_llama3` (block-partitioned Llama denoiser);
- train specs `dblocks_vit` (ViT classifier) and `dblocks_dit` (class-conditional DiT);
- model converter `diffusion_blocks` (stock llama3 -> denoiser, in place);
- text datasets `synthetic_text` and `text_file`.
"""

from .registry import register_all

register_all()
