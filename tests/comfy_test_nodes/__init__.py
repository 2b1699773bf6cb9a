"""Test-only ComfyUI nodes (loaded by the end-to-end test, never shipped): a tiny SDXL MODEL/CLIP
built in-process, a weight dump and latent statistics."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import torch  # noqa: E402,F401  (ComfyUI loads torch before any node)
from comfy_support import build_tiny_sdxl  # noqa: E402


class LohakrTestTinySDXL:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed):
        return build_tiny_sdxl(seed)


class LohakrTestWeightDump:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "dump"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def dump(self, model, clip, path):
        import comfy.model_management as mm
        from safetensors.torch import save_file

        mm.load_models_gpu([model])
        clip.load_model()
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.model.state_dict().items()}
        state.update({f"clip:{k}": v.detach().float().cpu().contiguous()
                      for k, v in clip.cond_stage_model.state_dict().items()})
        save_file(state, path)
        return {"ui": {"dumped": [len(state)]}}


class LohakrTestLatentStats:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def stats(self, samples, path):
        from safetensors.torch import save_file

        latent = samples["samples"].float()
        save_file({"latent": latent.contiguous()}, path)
        return {"ui": {"sum": [float(latent.sum())], "absmean": [float(latent.abs().mean())]}}


NODE_CLASS_MAPPINGS = {"LohakrTestTinySDXL": LohakrTestTinySDXL, "LohakrTestWeightDump": LohakrTestWeightDump,
                       "LohakrTestLatentStats": LohakrTestLatentStats}
