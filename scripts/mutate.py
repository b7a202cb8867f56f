"""Mutation testing for lora_edu: does the test suite catch plausible one-line bugs?

Each mutant below is one plausible bug: an exact snippet of one module, its replacement, a
one-line description, and the few test files (or test ids) that ought to catch it. For each
mutant the script copies the repository into a fresh temporary folder, applies the mutant to
the copy only, and runs the mapped tests there with `-x -q -p no:cacheprovider` under a
per-mutant timeout. The mutant is *killed* when a test fails, *survived* when all pass.

The copy's lora_edu must be the one the tests import, not the editable install of the
working tree: the tests run with the copy as working directory and PYTHONPATH=<copy> first
on the path. Checks run before the mutants, so that a score cannot be an artefact:

    import   `import lora_edu` inside the copy, with the tests' environment, resolves into the copy
    canary   a mutant that makes `import lora_edu` raise; it must be killed (were the
             working tree's lora_edu imported instead, it would survive)
    clean    the copy without any mutant passes every selected test set (otherwise a
             "kill" could be a test that fails anyway)

A snippet that is not found exactly once in its module is an error, never a silent skip.

    .venv/bin/python scripts/mutate.py --list                 # the mutants, checked against the tree
    .venv/bin/python scripts/mutate.py                        # all of them, one at a time
    .venv/bin/python scripts/mutate.py --only 'blockwise.*' --only ledger.adapter_states_base_policy
    .venv/bin/python scripts/mutate.py --tests-from /tmp/old/tests --json before.json  # an older suite

Not part of CI: a full run takes about half an hour on 2 cores. To add a mutant, append a
`mutant(...)` call to MUTANTS (keep a module's mutants together); map it to the test files
that own that behaviour, and prefer test ids (file::test) to whole slow files.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a copy leaves out: environments, builds, caches, the git folder
IGNORE = shutil.ignore_patterns(".venv", "venv", "_build", ".git", "node_modules", "__pycache__", ".pytest_cache",
                                ".hypothesis", ".cache", ".whl", "*.egg-info", ".ipynb_checkpoints")
PYTEST_FLAGS = ("-x", "-q", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Mutant:
    name: str  # "<module>.<what breaks>", unique
    module: str  # path from the repository root
    original: str  # exact snippet, found exactly once in module
    replacement: str
    description: str  # one line: the bug, as a reader would describe it
    tests: tuple  # pytest arguments: test files or test ids (file::test)


class MutantError(Exception):
    """A mutant that cannot be applied or run as written: an error in this script, not a result."""


MUTANTS: list[Mutant] = []


def mutant(name, module, original, replacement, description, *tests) -> None:
    if not tests:
        raise MutantError(f"{name}: map it to at least one test file")
    MUTANTS.append(Mutant(name, f"lora_edu/{module}", original, replacement, description, tuple(tests)))


# --------------------------------------------------------------------------- methods
T = "tests/"
mutant("lora.scaling_ignores_rslora", "methods/lora.py",
       "self.scaling = lora_scaling(alpha, r, rslora)", "self.scaling = lora_scaling(alpha, r)",
       "LoRALinear(rslora=True) still scales by alpha/r", T + "test_lora.py")
mutant("lora.forward_drops_scaling", "methods/lora.py",
       "return ((x @ a.T) @ b.T) * self.scaling", "return ((x @ a.T) @ b.T)",
       "the forward adds B A x without s (merge still uses s)", T + "test_lora.py")
mutant("lora.fast_path_drops_scaling", "methods/lora.py",
       "(self.lora_B * self.scaling).to(dtype).T", "self.lora_B.to(dtype).T",
       "the bypass_dtype fast path (addmm into out) adds B A x without s",
       T + "test_lora.py")
mutant("lora.no_dropout_on_bypass", "methods/lora.py",
       "return self.lora_dropout(x.to(self.compute_dtype))", "return x.to(self.compute_dtype)",
       "lora_dropout is built but never applied", T + "test_lora.py")
mutant("lora.kaiming_a5", "methods/lora.py",
       "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))", "nn.init.kaiming_uniform_(self.lora_A, a=5)",
       "A's Kaiming init with a=5 instead of sqrt(5) (a bound 2.3x too small)", T + "test_lora.py")
mutant("lora.unmerge_adds", "methods/lora.py",
       "w.copy_((w.float() - self.delta_weight()).to(w.dtype))",
       "w.copy_((w.float() + self.delta_weight()).to(w.dtype))",
       "unmerge adds dW a second time (sign flip)", T + "test_lora.py")
mutant("lora.merged_still_adds_bypass", "methods/lora.py",
       "if self.merged:  # dW already lives inside base.weight", "if False:  # dW already lives inside base.weight",
       "after merge the forward adds the bypass again (dW counted twice)", T + "test_lora.py")
mutant("lora.base_not_frozen", "methods/lora.py",
       "base.requires_grad_(False)  # W0 (and its bias) stay frozen", "pass  # W0 (and its bias) stay frozen",
       "the wrapped base layer stays trainable", T + "test_lora.py")
mutant("lora.frozen_version_ignores_writes", "methods/lora.py",
       "return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self.frozen_tensors())",
       "return tuple((t.data_ptr(), t.dtype, t.device) for t in self.frozen_tensors())",
       "the cache key of W0 ignores in-place writes (load_state_dict, merge): DoRA keeps a stale ||W0||^2",
       T + "test_dora.py")
# DoRALinear: norms from ||W0||^2 (cached) + 2s B.(W0 A^T) + s^2 B(AA^T).B, the rescale, merge, dropout
mutant("dora.magnitude_column_norm", "methods/dora.py",
       "torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32)", "torch.linalg.vector_norm(w0, dim=0, dtype=torch.float32)",
       "||W0||^2 (and so the magnitude and every ||V||) taken over columns (wrong axis)", T + "test_dora.py")
# the forward's ||V|| is weight_norm(), detached by its no_grad; directed_weight's .detach() is only
# reached from merge and effective_weight (no gradient), so a mutant there would be equivalent
mutant("dora.norm_not_detached", "methods/dora.py",
       "    @torch.no_grad()\n    def weight_norm(self)", "    def weight_norm(self)",
       "||V|| not detached: gradients flow through the row norm (DoRA sec. 4.3 says constant)", T + "test_dora.py")
mutant("dora.cross_term_beta_s", "methods/dora.py",
       "beta=2 * s, alpha=s * s)", "beta=s, alpha=s * s)",
       "the cross term of ||V||^2 weighted s instead of 2s", T + "test_dora.py")
mutant("dora.quadratic_term_s", "methods/dora.py",
       "beta=2 * s, alpha=s * s)", "beta=2 * s, alpha=s)",
       "the B A A^T B term of ||V||^2 weighted s instead of s^2", T + "test_dora.py")
mutant("dora.norm_cache_never_refreshed", "methods/dora.py",
       "if cache is None or cache[1] != key or any(ref() is not t for ref, t in zip(cache[0], tensors)):",
       "if cache is None:",
       "||W0||^2 is cached once and never recomputed when W0 changes (frozen_version ignored)",
       T + "test_dora.py")
mutant("dora.magnitude_init_squared", "methods/dora.py",
       "self.magnitude = nn.Parameter(self.weight_norm())",
       "self.magnitude = nn.Parameter(self.frozen_row_sq_norms().clone())",
       "the magnitude starts as ||W0||^2 (the cached squares, sqrt forgotten), not weight_norm()",
       T + "test_dora.py")
mutant("dora.zero_rows_never_found", "methods/dora.py",
       "torch.nonzero(row_sq_norms == 0)", "torch.nonzero(row_sq_norms < 0)",
       "check_nonzero_rows never finds a zero row: DoRA wraps it and divides 0 by 0", T + "test_dora.py")
mutant("dora.refused_layer_left_frozen", "methods/lora.py",
       "        self.check_base()  # before anything is frozen: a refused layer is left as it was\n"
       "        base.requires_grad_(False)  # W0 (and its bias) stay frozen",
       "        base.requires_grad_(False)  # W0 (and its bias) stay frozen\n"
       "        self.check_base()  # before anything is frozen: a refused layer is left as it was",
       "the base is frozen before DoRA's zero-row check: a refused DoRALinear leaves the caller's layer frozen",
       T + "test_dora.py")
mutant("dora.forward_drops_bias", "methods/dora.py",
       "bias = self.base.bias", "bias = None",
       "DoRA's forward forgets the base bias", T + "test_dora.py")
mutant("dora.rslora_dropped", "methods/dora.py",
       "super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)",
       "super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=False, bypass_dtype=bypass_dtype)",
       "DoRALinear(rslora=True) scales by alpha/r", T + "test_dora.py")
mutant("dora.rescale_in_bypass_dtype", "methods/dora.py",
       "dtype = torch.promote_types(wx.dtype, self.compute_dtype)\n        z = self.add_lora_product(",
       "dtype = self.compute_dtype\n        z = self.add_lora_product(",
       "the rescale runs in the bypass dtype: a bf16 bypass rounds a float32 base's W0 x to bf16",
       T + "test_dora.py::test_a_bf16_bypass_on_a_float32_base_rounds_the_bypass_only",
       T + "test_memory.py::test_dora_rescale_is_as_wide_as_the_wider_of_base_and_bypass")
mutant("dora.dropout_rescale_sees_whole_x", "methods/dora.py",
       "wx = self.base_product(xd.to(out.dtype))", "wx = self.base_product(x)",
       "with dropout the (c - 1) W0 x~ term uses the whole x, not the dropped-out x~ (PEFT's form)",
       T + "test_dora.py", T + "test_dora_parity.py::test_dropout_in_training_equals_peft",
       T + "test_dora_parity.py::test_dropout_follows_the_formula")
mutant("dora.merge_stores_magnitude", "methods/dora.py",
       "self._merged_norm = norm", "self._merged_norm = self.magnitude.detach().clone()",
       "merge keeps the magnitude instead of ||V|| for unmerge (unmerge leaves W' - dW)", T + "test_dora.py")
mutant("dora.unmerge_inverted_ratio", "methods/dora.py",
       "v = w.float() * (self._merged_norm / self.magnitude)[:, None]",
       "v = w.float() * (self.magnitude / self._merged_norm)[:, None]",
       "unmerge multiplies by magnitude / ||V|| instead of dividing", T + "test_dora.py")
mutant("dora.unmerge_keeps_delta", "methods/dora.py",
       "w.copy_((v - self.delta_weight()).to(w.dtype))", "w.copy_(v.to(w.dtype))",
       "unmerge restores V = W0 + s B A, forgetting to subtract dW", T + "test_dora.py")
mutant("hparams.scalings_swapped", "methods/hparams.py",
       "return alpha / math.sqrt(r) if rslora else alpha / r", "return alpha / r if rslora else alpha / math.sqrt(r)",
       "alpha/r and alpha/sqrt(r) swapped", T + "test_lora.py")
mutant("hparams.dropout_one_allowed", "methods/hparams.py",
       "not 0.0 <= dropout < 1.0", "not 0.0 <= dropout <= 1.0",
       "dropout = 1.0 (drop everything) accepted", T + "test_lora.py")
mutant("hparams.r_zero_allowed", "methods/hparams.py",
       "if r <= 0:", "if r < 0:",
       "r = 0 passes the check (off by one)", T + "test_lora.py")
mutant("hparams.alpha_bool_allowed", "methods/hparams.py",
       "if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)", "if not isinstance(alpha, numbers.Real)",
       "alpha=True accepted as alpha = 1 (missing check)", T + "test_lora.py", T + "test_error_paths.py")
mutant("hparams.zero_width_shape_allowed", "methods/hparams.py",
       "if d <= 0 or k <= 0:", "if d < 0 or k < 0:",
       "lora_param_count accepts a layer of width 0", T + "test_inject.py")
mutant("inject.exclude_ignored", "methods/inject.py",
       "if isinstance(m, nn.Linear) and not any(_matches(name, e) for e in exclude)}", "if isinstance(m, nn.Linear)}",
       "resolve_targets ignores exclude: prepare_qlora(model, ['lm_head']) attaches nothing, silently",
       T + "test_inject.py", T + "test_qlora.py",
       T + "test_memory.py::test_prepare_qlora_checks_before_touching_the_model")
mutant("inject.suffix_without_dot", "methods/inject.py",
       'return name == target or name.endswith("." + target)', "return name == target or name.endswith(target)",
       "target 'q_proj' also matches 'qq_proj' (suffix not on a dot)", T + "test_inject.py")
mutant("inject.partial_match_ok", "methods/inject.py",
       "    if missing:", "    if missing and not chosen:",
       "a target that matches nothing passes if another one matched", T + "test_inject.py")
mutant("inject.wrap_does_not_freeze", "methods/inject.py",
       "    model.requires_grad_(False)\n    for name in names:", "    for name in names:",
       "inject_lora leaves the rest of the model trainable", T + "test_inject.py")
mutant("inject.dora_flag_ignored", "methods/inject.py",
       "cls = DoRALinear if dora else LoRALinear", "cls = LoRALinear",
       "inject_lora(dora=True) makes plain LoRA layers", T + "test_inject.py")
mutant("inject.merge_lora_no_precheck", "methods/inject.py",
       "if not layer.mergeable:", "if False:",
       "merge_lora merges the LoRA layers before it meets a QLoRA one and raises",
       T + "test_qlora.py::test_merge_lora_refuses_before_merging_anything", T + "test_inject.py")

# methods/adapters.py, safe_files.py, peft_files.py: the adapter files
A = (T + "test_adapters.py", T + "test_adapter_fuzz.py", T + "test_peft_files.py")
mutant("adapters.no_tensor_key_check", "methods/adapters.py",
       "    if set(expected) != set(tensors):", "    if False:",
       "the file's tensor keys are not compared with the layers' (a file missing lora_B loads)", *A)
mutant("adapters.no_shape_check", "methods/adapters.py",
       "    if wrong:\n", "    if False:\n",
       "a file for other layer shapes is not refused before copying", *A)
mutant("adapters.config_diff_ignores_alpha_and_rslora", "methods/adapters.py",
       "diff = {k: (config[k], model_config[k]) for k in _CONFIG_KEYS if",
       "diff = {k: (config[k], model_config[k]) for k in _CONFIG_KEYS[:2] if",
       "loading into an injected model compares method and r only", *A)
mutant("adapters.fresh_load_drops_rslora", "methods/adapters.py",
       'dropout=config["dropout"], rslora=config["rslora"], dora=',
       'dropout=config["dropout"], rslora=False, dora=',
       "a fresh load injects alpha/r even for an rsLoRA file", *A)
mutant("adapters.load_rounds_to_bf16", "methods/adapters.py",
       "param.copy_(value.to(param.device, param.dtype))",
       "param.copy_(value.to(param.device, torch.bfloat16))",
       "loaded values pass through bfloat16 (not bit-exact)", *A)
mutant("adapters.no_exact_metadata_keys", "methods/adapters.py",
       'if metadata["format"] == FORMAT and set(metadata) != _METADATA_KEYS:',
       'if False:',
       "v2 files with a renamed or missing metadata key (e.g. the hash) are not refused", *A)
mutant("adapters.load_into_merged", "methods/adapters.py",
       "    if any(layer.merged for layer in adapter_modules(model).values()):\n        raise ValueError(\"the model's adapters are merged",
       "    if False:\n        raise ValueError(\"the model's adapters are merged",
       "load_adapter writes into a merged model", *A)
mutant("safe_files.hash_skips_tensor_bytes", "methods/safe_files.py",
       "        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())\n", "",
       "the content hash covers keys, dtypes and shapes but not the tensors' bytes", *A)
mutant("safe_files.hash_skips_metadata", "methods/safe_files.py",
       "        h.update(json.dumps([key, metadata[key]]).encode())", "        pass",
       "the content hash ignores the config (alpha edited in the file loads)", *A)
mutant("safe_files.no_hash_check", "methods/safe_files.py",
       "if key in metadata and content_hash(metadata, tensors, skip=key) != metadata[key]:",
       "if False:", "the recorded hash is never compared", *A)
mutant("safe_files.no_pickle_sniff", "methods/safe_files.py",
       'if head[8:9] != b"{" and (head.startswith(b"\\x80") or head.startswith(b"PK\\x03\\x04")):',
       "if False:", "a torch.save pickle gets the generic unreadable-file error", *A)
mutant("safe_files.rslora_type_unchecked", "methods/safe_files.py",
       'if not isinstance(config["rslora"], bool):', "if False:",
       "rslora='no' in a file is taken as true", *A)
mutant("peft_files.targets_as_suffix_list", "methods/peft_files.py",
       '"target_modules": "|".join(re.escape(name) for name in config["targets"]),',
       '"target_modules": sorted(config["targets"]),',
       "the export lists target names, which PEFT matches by suffix (layers.10.* also matches)", *A)
mutant("peft_files.export_drops_rslora", "methods/peft_files.py",
       '"use_rslora": config["rslora"],', '"use_rslora": False,',
       "the exported config says alpha/r for an rsLoRA adapter", *A)
mutant("peft_files.magnitude_key_with_weight", "methods/peft_files.py",
       '"magnitude": ".lora_magnitude_vector"}', '"magnitude": ".lora_magnitude_vector.weight"}',
       "DoRA's magnitude written under older PEFT's key, which PEFT 0.21 does not load", *A)
mutant("peft_files.import_ignores_use_dora", "methods/peft_files.py",
       'method = "dora" if raw.get("use_dora", False) else "lora"', 'method = "lora"',
       "a PEFT DoRA folder is read as LoRA", *A)
mutant("peft_files.no_must_be_off_check", "methods/peft_files.py",
       "        if not _is_off(key, raw.get(key)):\n            raise AdapterFileError(f\"{path!r} sets {key}",
       "        if False:\n            raise AdapterFileError(f\"{path!r} sets {key}",
       "rank_pattern, bias, modules_to_save ... are ignored on import", *A)
mutant("peft_files.no_init_check", "methods/peft_files.py",
       "    if not any(init is v or (isinstance(v, str) and init == v) for v in _INITS_THAT_KEEP_THE_BASE):",
       "    if False:", "a PiSSA/OLoRA folder (its base rewritten) loads onto the original base", *A)
mutant("peft_files.prefix_off_by_one", "methods/peft_files.py",
       "name = key[len(PREFIX): -len(KEY_SUFFIX[match[0]])]", "name = key[len(PREFIX) + 1: -len(KEY_SUFFIX[match[0]])]",
       "module names lose their first character on import", *A)
mutant("peft_files.no_peft_hash_check", "methods/peft_files.py",
       "    check_hash(metadata, tensors, weights_path, key=HASH_META)", "    pass",
       "a corrupted export of ours loads silently", *A)


# --------------------------------------------------------------------------- quant
mutant("blockwise.ties_round_up", "quant/blockwise.py",
       "return torch.bucketize(scaled, midpoints, out_int32=True)",
       "return torch.bucketize(scaled, midpoints, out_int32=True, right=True)",
       "a value exactly on a midpoint rounds to the upper level (bitsandbytes: lower)", T + "test_nf4.py")
mutant("blockwise.absmax_without_abs", "quant/blockwise.py",
       "absmax = blocks.abs().amax(dim=1)", "absmax = blocks.amax(dim=1)",
       "the block scale is max(w), not max|w|", T + "test_nf4.py")
mutant("blockwise.ragged_block_multiplies", "quant/blockwise.py",
       "if numel % blocks.shape[1]:", "if False:",
       "the ragged last block multiplies by 1/c like the others (bitsandbytes divides)",
       T + "test_nf4.py", T + "test_nf4_parity.py::test_ragged_last_block_divides_full_blocks_multiply")
mutant("blockwise.zero_block_unclamped", "quant/blockwise.py",
       "safe = absmax.clamp(min=MIN_ABSMAX)  # [n_blocks]", "safe = absmax  # [n_blocks]",
       "an all-zero block divides 0 by 0: NaN codes (still dequantize to 0)", T + "test_nf4.py")
mutant("blockwise.nibbles_low_first", "quant/blockwise.py",
       "return (codes[0::2] << 4) | codes[1::2]", "return codes[0::2] | (codes[1::2] << 4)",
       "pack_nibbles puts the first code in the low nibble", T + "test_nf4.py")
mutant("blockwise.unpack_low_first", "quant/blockwise.py",
       "pairs = torch.stack([packed >> 4, packed & 0x0F], dim=1)",
       "pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1)",
       "unpack_nibbles reads the low nibble first", T + "test_nf4.py")
mutant("blockwise.byte_table_swapped", "quant/blockwise.py",
       "return torch.stack([lv[byte >> 4], lv[byte & 0x0F]], dim=1)",
       "return torch.stack([lv[byte & 0x0F], lv[byte >> 4]], dim=1)",
       "the fast path's byte table swaps the two weights of a byte", T + "test_nf4.py")
mutant("blockwise.chunk_splits_blocks", "quant/blockwise.py",
       "chunk = min(max(CHUNK_BYTES, block_size // 2), n_bytes)", "chunk = min(CHUNK_BYTES, n_bytes)",
       "an eager chunk can be shorter than one block",
       T + "test_nf4.py::test_fast_dequantize_across_chunks_is_the_definition")
mutant("blockwise.levels_repeats_refused", "quant/blockwise.py",
       "(levels[1:] < levels[:-1]).any()", "(levels[1:] <= levels[:-1]).any()",
       "check_levels rejects a repeated level (INT4's -1, FP4's -0/+0)", T + "test_nf4.py")
mutant("blockwise.levels_count_unchecked", "quant/blockwise.py",
       "if levels.numel() < 2 or (levels[1:]", "if (levels[1:]",
       "check_levels accepts a table of one level", T + "test_nf4.py", T + "test_error_paths.py")
mutant("blockwise.pad_wrong_sign", "quant/blockwise.py",
       "pad = -x.numel() % block_size", "pad = x.numel() % block_size",
       "to_blocks pads by n mod B instead of up to the next block", T + "test_nf4.py")
mutant("double_quant.block_256_on_read", "quant/double_quant.py",
       "centred = dequantize_blockwise(self.codes, self.absmax, self.code, self.block_size)",
       "centred = dequantize_blockwise(self.codes, self.absmax, self.code, 256)",
       "the second-level block size is hard-wired to 256 when reading back", T + "test_nf4.py",
       T + "test_double_quant.py")
mutant("double_quant.not_centred", "quant/double_quant.py",
       "centred = absmax - offset  # [n_scales]", "centred = absmax  # [n_scales]",
       "the scales are not centred on their mean before the 8-bit code", T + "test_nf4.py")
mutant("double_quant.offset_dropped_on_read", "quant/double_quant.py",
       "return centred + self.offset", "return centred",
       "dequantize forgets to add the offset back", T + "test_nf4.py")
mutant("double_quant.decade_exponent", "quant/double_quant.py",
       "magnitudes.append(10.0 ** (fraction_bits - 6) * centres)",
       "magnitudes.append(10.0 ** (-fraction_bits) * centres)",
       "the dynamic map gives the many-fraction-bit groups the small decades", T + "test_nf4.py")
mutant("double_quant.lut_truncates", "quant/double_quant.py",
       "* (LUT_SIZE - 1) + 0.5).to(torch.int64)", "* (LUT_SIZE - 1)).to(torch.int64)",
       "the LUT rounding truncates to the grid instead of rounding",
       T + "test_nf4_parity.py::test_double_quantization_is_identical_with_lut_rounding", T + "test_nf4.py")
mutant("double_quant.lut_zero_block_code", "quant/double_quant.py",
       "return torch.where(absmax[:, None] == 0, 0, codes), absmax", "return codes, absmax",
       "a block of equal scales gets the nearest code of 0, not bitsandbytes' code 0",
       T + "test_nf4.py", T + "test_double_quant.py")
mutant("double_quant.second_level_floor", "quant/double_quant.py",
       "expected = -(-self.codes.numel() // self.block_size)", "expected = self.codes.numel() // self.block_size",
       "the second-level absmax count rounds down (a ragged block of scales is refused)", T + "test_sizes.py")
mutant("double_quant.nbytes_no_offset", "quant/double_quant.py",
       "return self.codes.numel() + 4 * self.absmax.numel() + 4", "return self.codes.numel() + 4 * self.absmax.numel()",
       "nbytes leaves out the float32 offset", T + "test_sizes.py")
mutant("levels.nf4_offset_rounded", "quant/levels.py",
       "NF4_OFFSET = 0.9677083", "NF4_OFFSET = 0.9677",
       "the NF4 offset constant rounded to 4 digits (levels move by 1e-4)", T + "test_nf4.py")
mutant("levels.nf4_grid_float64", "quant/levels.py",
       "p = torch.linspace(NF4_OFFSET, 0.5, n + 1, dtype=torch.float32)[:-1]",
       "p = torch.linspace(NF4_OFFSET, 0.5, n + 1, dtype=torch.float64)[:-1]",
       "the probability grid in float64 (levels move by a few ulp from QLoRA's)",
       T + "test_nf4.py", T + "test_nf4_parity.py::test_nf4_table_is_bitsandbytes_table")
mutant("levels.nf4_keeps_half", "quant/levels.py",
       "n + 1, dtype=torch.float32)[:-1]", "n + 1, dtype=torch.float32)[1:]",
       "the quantile grid drops its outer end instead of p = 0.5 (off by one)", T + "test_nf4.py")
mutant("levels.int4_eighths", "quant/levels.py",
       "return torch.cat([torch.tensor([-1.0]), k / 7])", "return torch.cat([torch.tensor([-1.0]), k / 8])",
       "INT4 levels k/8 for k = -7..7 (max 7/8, not 1)", T + "test_nf4.py")
mutant("levels.bnb_fp4_subnormal", "quant/levels.py",
       "normal[:1] / 32", "normal[:1] / 16",
       "bitsandbytes' FP4 subnormal at 1/16 of the smallest normal", T + "test_nf4.py")
mutant("levels.e2m1_no_bias", "quant/levels.py",
       "2 ** (e[:, None] - 1)", "2 ** e[:, None]",
       "E2M1's exponent without its bias of 1", T + "test_nf4.py")
mutant("quantized.pad_code_index_zero", "quant/quantized.py",
       "zero_code = int(round_to_levels(torch.zeros(1, device=levels.device), levels))", "zero_code = 0",
       "an odd count pads with code 0 (level -1) instead of the code of 0.0", T + "test_nf4.py")
mutant("quantized.codes_floor_half", "quant/quantized.py",
       "if self.codes.shape != ((self.numel() + 1) // 2,):", "if self.codes.shape != (self.numel() // 2,):",
       "the code count rounds down: odd sizes are refused", T + "test_nf4.py")
mutant("quantized.n_blocks_floor", "quant/quantized.py",
       "return -(-self.numel() // self.block_size)", "return self.numel() // self.block_size",
       "n_blocks rounds down: a ragged last block is refused", T + "test_nf4.py")
mutant("quantized.dq_block_size_ignored", "quant/quantized.py",
       "absmax = double_quantize(absmax, dq_block_size, dq_rounding)",
       "absmax = double_quantize(absmax, 256, dq_rounding)",
       "quantize_4bit ignores dq_block_size", T + "test_nf4.py", T + "test_double_quant.py")
mutant("quantized.dequantize_ignores_dtype", "quant/quantized.py",
       "dtype = self.dtype if dtype is None else dtype", "dtype = self.dtype",
       "dequantize(dtype) returns the original dtype whatever is asked", T + "test_nf4.py")
mutant("quantized.levels_version_unchecked", "quant/quantized.py",
       "if seen is None or seen[0] is not self.levels or seen[1] != self.levels._version:",
       "if seen is None or seen[0] is not self.levels:",
       "levels edited in place are neither checked again nor re-tabled",
       T + "test_nf4_fast.py::test_levels_edited_in_place_are_caught_and_the_table_rebuilt")
mutant("qlora.from_linear_rank_plus_one", "quant/qlora.py",
       "return cls(nf4, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)",
       "return cls(nf4, r=r + 1, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)",
       "from_linear builds rank r + 1: s = alpha/(r+1), an 11% smaller bypass at r = 8",
       T + "test_qlora_parity.py")
mutant("qlora.from_linear_rslora_dropped", "quant/qlora.py",
       "return cls(nf4, r=r, alpha=alpha, dropout=dropout, rslora=rslora, bypass_dtype=bypass_dtype)",
       "return cls(nf4, r=r, alpha=alpha, dropout=dropout, rslora=False, bypass_dtype=bypass_dtype)",
       "QLoRALinear.from_linear(rslora=True) scales by alpha/r", T + "test_qlora.py")
mutant("qlora.from_linear_always_dq", "quant/qlora.py",
       "nf4 = NF4Linear.from_linear(base, block_size, double_quant, compute_dtype)",
       "nf4 = NF4Linear.from_linear(base, block_size, True, compute_dtype)",
       "QLoRALinear.from_linear(double_quant=False) double-quantizes anyway", T + "test_qlora.py")
mutant("qlora.skip_not_applied", "quant/qlora.py",
       "if not isinstance(module, nn.Linear) or any(_matches(name, k) for k in skip):",
       "if not isinstance(module, nn.Linear):",
       "prepare_qlora quantizes lm_head too (skip ignored)", T + "test_qlora.py",
       T + "test_memory.py::test_ledger_equals_a_16_bit_step_byte_for_byte")
mutant("qlora.model_not_cast", "quant/qlora.py",
       "model.requires_grad_(False).to(compute_dtype)  # before quantizing",
       "model.requires_grad_(False)  # before quantizing",
       "prepare_qlora leaves embeddings and norms float32 and quantizes from float32",
       T + "test_qlora.py", T + "test_memory.py::test_ledger_equals_a_16_bit_step_byte_for_byte")
mutant("qlora.backward_no_input_grad", "quant/qlora.py",
       "return grad_out @ w, None, None, None", "return None, None, None, None",
       "the NF4 matmul's backward gives no gradient to x (layers below get nothing)", T + "test_qlora.py")
mutant("qlora.merged_from_compute_dtype", "quant/qlora.py",
       "return self.base.dequantized_weight(dtype)", "return self.base.dequantized_weight()",
       "frozen_weight(float32) ignores the dtype: to_merged_linear adds dW to a bf16-rounded W0 (two roundings)",
       T + "test_qlora.py")
mutant("qlora.qdora_norms_from_float32_dequant", "quant/qlora.py",
       "return self.base.dequantized_weight(dtype)", "return self.base.dequantized_weight(dtype or torch.float32)",
       "QDoRA's magnitude and ||V|| from dequant(W0) in float32, not the compute-dtype W0 the base multiplies by",
       T + "test_qlora.py", T + "test_dora_parity.py::test_qdora_equals_peft_dora_on_linear4bit")
mutant("qlora.qdora_stale_norm_cache", "quant/qlora.py",
       "return (self.base.weight_q.codes, *scales)", "return (self.base.weight_q.codes,)",
       "the NF4 base's cache key ignores the scales: QDoRA keeps a stale ||W0||^2 after they change",
       T + "test_qlora.py")
mutant("dora.cache_trusts_the_address", "methods/dora.py",
       "if cache is None or cache[1] != key or any(ref() is not t for ref, t in zip(cache[0], tensors)):",
       "if cache is None or cache[1] != key:",
       "a new weight at a freed one's address, version 0 again, passes for the cached one",
       T + "test_dora.py::test_a_new_weight_is_never_mistaken_for_the_cached_one")
mutant("sizes.block_zero_allowed", "quant/sizes.py",
       "if block_size <= 0 or block_size & (block_size - 1):", "if block_size < 0 or block_size & (block_size - 1):",
       "block size 0 passes the power-of-two check", T + "test_nf4.py")
mutant("sizes.dq_scales_floor", "quant/sizes.py",
       "return n_blocks + 4 * -(-n_blocks // dq_block_size) + 4",
       "return n_blocks + 4 * (n_blocks // dq_block_size) + 4",
       "scale_bytes rounds the second-level scales down", T + "test_sizes.py")
mutant("sizes.bits_dq_block_ignored", "quant/sizes.py",
       "absmax_bits / (block_size * dq_block_size)", "absmax_bits / (block_size * 256)",
       "bits_per_param ignores dq_block_size", T + "test_sizes.py", T + "test_nf4.py")

# --------------------------------------------------------------------------- memory
mutant("spec.gqa_ignored", "memory/spec.py",
       "spec.n_kv_heads * spec.head_dim", "spec.n_heads * spec.head_dim",
       "k and v keep full width under grouped-query attention", T + "test_ledger.py")
mutant("spec.one_norm_per_layer", "memory/spec.py",
       "+ 2 * h  # + two RMSNorm weights", "+ h  # + two RMSNorm weights",
       "one RMSNorm weight per layer counted instead of two", T + "test_ledger.py")
mutant("spec.tied_head_counted", "memory/spec.py",
       "(0 if spec.tie_embeddings else embed)", "embed",
       "a tied lm_head is counted a second time", T + "test_ledger.py")
mutant("spec.repeated_targets", "memory/spec.py",
       "for n in dict.fromkeys(names)]", "for n in names]",
       "('q', 'q_proj') counts q twice", T + "test_ledger.py")
mutant("spec.dora_magnitude_left_out", "memory/spec.py",
       "return lora_param_count(shapes, r) + (sum(d for d, _ in shapes) if dora else 0)",
       "return lora_param_count(shapes, r)",
       "lora_params_for(dora=True) forgets the magnitude's d per adapted linear", T + "test_ledger.py")
mutant("ledger.qdora_no_magnitude", "memory/ledger.py",
       "P_lora = lora_params_for(spec, targets, r, dora=method in DORA_METHODS)",
       "P_lora = lora_params_for(spec, targets, r, dora=method == \"dora\")",
       "QDoRA's trained parameters counted as QLoRA's (no magnitude)", T + "test_ledger.py")
mutant("ledger.adapter_states_base_policy", "memory/ledger.py",
       "led.lora_optimizer_states = P_lora * n_states * as_", "led.lora_optimizer_states = P_lora * n_states * s",
       "the adapters' Adam states take the base policy's width (pure bf16 base, fp32 adapters: half)",
       T + "test_ledger.py", T + "test_peak.py")
mutant("ledger.adapter_width_base_policy", "memory/ledger.py",
       "adapter_bytes=POLICIES[adapter_policy or policy][0])", "adapter_bytes=POLICIES[policy][0])",
       "the activations count the adapters at the base's width (no float32 copies of x)",
       T + "test_ledger.py", T + "test_memory.py::test_ledger_equals_a_16_bit_step_byte_for_byte")
mutant("ledger.qlora_rest_two_bytes", "memory/ledger.py",
       "for d, k in shapes) + (P - Q) * w", "for d, k in shapes) + (P - Q) * 2",
       "QLoRA's unquantized weights always 2 bytes, whatever the policy", T + "test_ledger.py", T + "test_memory.py")
mutant("ledger.korthikanti_no_seq", "memory/ledger.py",
       "one_layer = s * b * h * (34 + 5 * a * s / h)", "one_layer = s * b * h * (34 + 5 * a / h)",
       "Korthikanti's attention-score term without its factor s", T + "test_ledger.py")
mutant("ledger.frozen_base_master_copy", "memory/ledger.py",
       "led.weights = P * w  # frozen base, still resident",
       "led.weights, led.master_weights = P * w, P * m  # frozen base, still resident",
       "LoRA's frozen base gets a master copy", T + "test_ledger.py")
mutant("activations.swiglu_u_for_up", "memory/activations.py",
       "if gate:  # silu(g) * u: u for the gradient of silu(g)", "if up:  # silu(g) * u: u for the gradient of silu(g)",
       "u is kept when up_proj needs a gradient instead of when gate_proj does", T + "test_memory.py")
mutant("activations.lse_in_act_width", "memory/activations.py",
       'f"{tag}lse", batch * spec.n_heads * seq_len * 4)', 'f"{tag}lse", batch * spec.n_heads * seq_len * e)',
       "the attention log-sum-exp counted at the activation width, not float32", T + "test_memory.py")
mutant("activations.loss_scalar_dropped", "memory/activations.py",
       'tokens * spec.vocab_size * e + e)', 'tokens * spec.vocab_size * e)',
       "the loss's saved total weight (a scalar) is left out", T + "test_memory.py")
mutant("activations.ids_without_extra_token", "memory/activations.py",
       'terms["token ids"] += batch * (seq_len + 1) * 8', 'terms["token ids"] += batch * seq_len * 8',
       "the saved ids counted as [batch, seq] (they view [batch, seq + 1])", T + "test_memory.py")
mutant("activations.ckpt_lora_no_grad", "memory/activations.py",
       "needs_grad = needs_grad or full or bool(chosen)", "needs_grad = needs_grad or full",
       "under checkpointing LoRA's layer outputs are taken to need no gradient", T + "test_memory.py")
mutant("activations.dora_rescale_at_act_width", "memory/activations.py",
       "wide = max(e, a)  # promote_types", "wide = e  # promote_types",
       "DoRA's V x and c counted at the activations' width, not the wider of base and adapters",
       T + "test_ledger.py", T + "test_memory.py::test_dora_rescale_is_as_wide_as_the_wider_of_base_and_bypass")
mutant("activations.dora_norm_at_rescale_width", "memory/activations.py",
       'f"{tag}{name}.norm", out_features * 4)', 'f"{tag}{name}.norm", out_features * wide)',
       "DoRA's saved ||V|| counted at the rescale's width, not float32",
       T + "test_ledger.py", T + "test_memory.py::test_dora_rescale_is_as_wide_as_the_wider_of_base_and_bypass")
mutant("activations.qdora_without_rescale", "memory/activations.py",
       'tag=f"{i}.", dora=method in DORA_METHODS)', 'tag=f"{i}.", dora=method == "dora")',
       "QDoRA's saved activations leave out DoRA's rescale (counted as QLoRA's)", T + "test_ledger.py")
mutant("activations.shared_input_per_adapter", "memory/activations.py",
       "if a == e:  # the adapter's x is the base's x\n                keep(\"linear inputs\", f\"{tag}{x_name}\"",
       "if a == e:  # the adapter's x is the base's x\n                keep(\"linear inputs\", f\"{tag}{name}.x\"",
       "q, k and v adapters each count their shared input once more", T + "test_memory.py")
mutant("peak.trained_policy_base", "memory/peak.py",
       "trained_policy = policy if method == \"full\" else (adapter_policy or policy)", "trained_policy = policy",
       "the optimizer step's temporaries take the base policy's width for the adapters", T + "test_peak.py",
       T + "test_ledger.py")
mutant("peak.one_logit_gradient", "memory/peak.py",
       '"logit gradients": 2 * logits', '"logit gradients": 1 * logits',
       "the loss backward holds one [tokens, vocab] gradient, not two", T + "test_peak.py", T + "test_ledger.py")
mutant("peak.master_step_two_temps", "memory/peak.py",
       "step_temps = largest * state_bytes * (3 if m else 2)", "step_temps = largest * state_bytes * 2",
       "under master weights the float32 gradient upcast is left out", T + "test_peak.py", T + "test_ledger.py")
mutant("peak.ckpt_keeps_log_probs", "memory/peak.py",
       '"checkpoints": led.activations - led.activation_terms["loss"],', '"checkpoints": led.activations,',
       "the log-probs are counted as alive while layers are rebuilt", T + "test_peak.py", T + "test_ledger.py")
mutant("peak.largest_factor_min", "memory/peak.py",
       "return max(max(d, k) * r for d, k in", "return max(min(d, k) * r for d, k in",
       "the largest LoRA factor taken as min(d, k) * r", T + "test_peak.py", T + "test_ledger.py")
mutant("peak.dora_norm_cache_left_out", "memory/peak.py",
       "+ _dora_norm_cache(spec, method, targets))", ")",
       "the resident bytes leave out DoRA's cached ||W0||^2 (float32 [d] per adapted linear)", T + "test_peak.py")
mutant("peak.logits_float32", "memory/peak.py",
       "logits = batch * seq_len * spec.vocab_size * e", "logits = batch * seq_len * spec.vocab_size * 4",
       "the logits counted as float32 under a 16-bit policy", T + "test_peak.py", T + "test_ledger.py")

# --------------------------------------------------------------------------- train
mutant("adam.v_correction_no_sqrt", "train/adam.py",
       "v_correction = math.sqrt(1 - b2 ** self.t)", "v_correction = 1 - b2 ** self.t",
       "the bias correction of v without its square root", T + "test_optim.py")
mutant("adam.lerp_weight_b1", "train/adam.py",
       "m.lerp_(g, 1 - b1)", "m.lerp_(g, b1)",
       "m <- (1 - b1) m + b1 g (betas swapped in the first moment)", T + "test_optim.py")
mutant("adam.eps_before_correction", "train/adam.py",
       "(v.sqrt() / v_correction).add_(self.eps)", "(v.sqrt().add_(self.eps) / v_correction)",
       "eps added before the bias correction", T + "test_optim.py")
mutant("adam.master_not_copied_back", "train/adam.py",
       "p.copy_(w)  # rounded once", "pass  # rounded once",
       "the master copy steps but the 16-bit weight never changes", T + "test_optim.py")
mutant("adam.lr_zero_allowed", "train/adam.py",
       "if not lr > 0 or", "if lr < 0 or",
       "lr = 0 accepted", T + "test_optim.py")
mutant("adam.states_in_param_dtype", "train/adam.py",
       "w = self.master.get(id(p), p)  # float32 moments", "w = p  # float32 moments",
       "m and v of a bf16 parameter with a master copy are bf16, not float32", T + "test_optim.py")
mutant("paged.bytes_in_not_accumulated", "train/paged.py",
       "self.bytes_paged_in += resident", "self.bytes_paged_in = resident",
       "bytes_paged_in keeps only the last copy", T + "test_optim.py")
# On the CPU the fetched state *is* the stored one (.to() to the same device returns it), so this
# one is equivalent there; tests/test_optim.py's CUDA test kills it on a GPU.
mutant("paged.v_not_stored_back", "train/paged.py",
       "home_v.copy_(v)", "pass",
       "v is not copied back to the offload device after the step", T + "test_optim.py",
       T + "test_qlora.py::test_paged_adam_trains_a_qlora_layer_like_torch_adam")
mutant("checkpointing.rng_not_forked", "train/checkpointing.py",
       "with torch.random.fork_rng(devices=ctx.devices):", "with torch.enable_grad():",
       "the backward rewinds the global RNG and leaves it rewound (later dropout masks repeat)",
       T + "test_memory.py::test_checkpointing_gives_the_same_gradients_and_reaches_the_first_layers_adapters",
       T + "test_checkpointing.py")
mutant("checkpointing.rng_not_restored", "train/checkpointing.py",
       "torch.set_rng_state(ctx.cpu_rng)", "pass",
       "the rebuilt forward draws other dropout masks than the first one",
       T + "test_memory.py::test_checkpointing_gives_the_same_gradients_and_reaches_the_first_layers_adapters",
       T + "test_checkpointing.py")
mutant("checkpointing.forward_records", "train/checkpointing.py",
       "with torch.no_grad():  # nothing recorded", "with torch.enable_grad():  # nothing recorded",
       "the checkpointed forward records its graph, saving every activation",
       T + "test_memory.py::test_checkpoint_keeps_only_the_inputs", T + "test_checkpointing.py")

# --------------------------------------------------------------------------- tiny
FAST_TINY = (T + "test_tiny_llama_parity.py", T + "test_tiny_transformer.py::test_causal",
             T + "test_tiny_transformer.py::test_logits_shape")
mutant("model.rmsnorm_sum", "tiny/model.py",
       "x.pow(2).mean(-1, keepdim=True)", "x.pow(2).sum(-1, keepdim=True)",
       "RMSNorm divides by the root of the sum of squares, not of their mean", *FAST_TINY)
mutant("model.rope_exponent", "tiny/model.py",
       "theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)",
       "theta ** (-torch.arange(0, head_dim // 2).float() / head_dim)",
       "RoPE frequencies theta^(-i/d) instead of theta^(-2i/d)", *FAST_TINY)
mutant("model.rope_sign", "tiny/model.py",
       "torch.cat([-x2, x1], dim=-1) * sin", "torch.cat([x2, -x1], dim=-1) * sin",
       "RoPE rotates the other way (sign flip)", *FAST_TINY)
mutant("model.not_causal", "tiny/model.py",
       "is_causal=True", "is_causal=False",
       "attention sees future tokens", *FAST_TINY)
mutant("model.mlp_reads_first_norm", "tiny/model.py",
       "return x + self.mlp(self.post_attention_layernorm(x))", "return x + self.mlp(self.input_layernorm(x))",
       "the MLP normalises with the attention's norm", *FAST_TINY)
mutant("model.loss_target_unshifted", "tiny/model.py",
       "batch[:, 1:].flatten())", "batch[:, :-1].flatten())",
       "lm_loss predicts the current token instead of the next",
       T + "test_tiny_llama_parity.py::test_lm_loss_is_hf_next_token_loss",
       T + "test_tiny_transformer.py::test_pretrained_model_is_cached_copy")
mutant("model.evaluate_leaves_eval", "tiny/model.py",
       "model.train(was_training)", "model.eval()",
       "evaluate leaves a model that was training in eval mode",
       T + "test_tiny_transformer.py::test_evaluate_restores_the_training_mode")
mutant("model.train_unseeded", "tiny/model.py",
       "torch.manual_seed(seed)  # anything stochastic", "pass  # anything stochastic",
       "train(seed=...) no longer seeds dropout: a LoRA-dropout run is not reproducible",
       T + "test_tiny_transformer.py::test_train_seeds_lora_dropout")
mutant("tasks.no_modulo", "tiny/tasks.py",
       "(x[:, t - 1] + s[:, 0]) % V)", "(x[:, t - 1] + s[:, 0]))",
       "counting runs past the vocabulary (no mod V)", T + "test_tiny_transformer.py::test_make_batches_deterministic",
       T + "test_tiny_transformer.py::test_noiseless_task_follows_its_rule")
mutant("tasks.noise_inverted", "tiny/tasks.py",
       "< task.noise  # [B, T]", "> task.noise  # [B, T]",
       "a token is noise with probability 1 - noise",
       T + "test_tiny_transformer.py::test_noiseless_task_follows_its_rule",
       T + "test_tiny_transformer.py::test_entropy_floor_is_the_noise_entropy")
mutant("tasks.entropy_rule_prob", "tiny/tasks.py",
       "p_rule, p_other = 1 - e + e / V, e / V", "p_rule, p_other = 1 - e, e / V",
       "the entropy floor forgets that noise can hit the rule's token",
       T + "test_tiny_transformer.py::test_noiseless_task_follows_its_rule",
       T + "test_tiny_transformer.py::test_entropy_floor_is_the_noise_entropy")
mutant("tasks.step_zero_allowed", "tiny/tasks.py",
       "0 < s < self.vocab_size", "0 <= s < self.vocab_size",
       "a step of 0 (a constant sequence) accepted", T + "test_tiny_transformer.py::test_bad_task_and_mismatch_raise")
mutant("tasks.empty_batches_allowed", "tiny/tasks.py",
       "if n <= 0 or batch_size <= 0:", "if n < 0 or batch_size < 0:",
       "make_batches(n=0) returns nothing instead of raising", T + "test_error_paths.py")

# --------------------------------------------------------------------------- teaching
mutant("flops.no_factor_two", "teaching/flops.py",
       "return 2 * batch * m * k * n", "return batch * m * k * n",
       "a multiply-add counted as one FLOP", T + "test_flops.py")
mutant("flops.broadcast_min", "teaching/flops.py",
       "math.prod(max(i, j) for", "math.prod(min(i, j) for",
       "broadcast batch dims counted at the smaller size", T + "test_flops.py")
mutant("printing.upper_bound_only", "teaching/printing.py",
       "for bound in (value * (1 - margin), value * (1 + margin)):", "for bound in (value * (1 + margin),):",
       "steady checks only the upper end of the spread", T + "test_printing.py")
mutant("printing.margin_always_one", "teaching/printing.py",
       "margin = rel * (WRITING_MARGIN if writing_outputs() else 1)", "margin = rel",
       "writing stored outputs asks for one spread, not three", T + "test_printing.py")
mutant("printing.zero_string_writing", "teaching/printing.py",
       'not in ("", "0")', '!= ""',
       "LORA_EDU_WRITING_OUTPUTS=0 counts as writing", T + "test_printing.py")
mutant("printing.rel_zero_rejected", "teaching/printing.py",
       "0 <= rel < 1", "0 < rel < 1",
       "rel = 0 (no spread) refused", T + "test_printing.py")

# a mutant that must be killed if the copy's lora_edu is the one imported (see the module docstring)
CANARY = Mutant("canary", "lora_edu/__init__.py", '__version__ = "0.1.0"',
                '__version__ = "0.1.0"\nraise ImportError("scripts/mutate.py canary: the copy was imported")',
                "import lora_edu raises", (T + "test_printing.py",))


# --------------------------------------------------------------------------- running
def check(mutants, root: Path = ROOT, tests_root: Path | None = None) -> None:
    """Raise MutantError unless every name is unique, every snippet is found once, every test file exists."""
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise MutantError(f"duplicate mutant names: {sorted({n for n in names if names.count(n) > 1})}")
    for m in mutants:
        path = root / m.module
        if not path.is_file():
            raise MutantError(f"{m.name}: no module {m.module}")
        found = path.read_text().count(m.original)
        if found != 1:
            raise MutantError(f"{m.name}: the snippet {m.original!r} occurs {found} times in {m.module}, not once")
        if m.original == m.replacement:
            raise MutantError(f"{m.name}: the replacement equals the original")
        if tests_root is None:
            for t in m.tests:
                if not (root / t.split("::")[0]).is_file():
                    raise MutantError(f"{m.name}: no test file {t.split('::')[0]}")


def apply(m: Mutant, root: Path) -> None:
    path = root / m.module
    text = path.read_text()
    if text.count(m.original) != 1:
        raise MutantError(f"{m.name}: the snippet occurs {text.count(m.original)} times in the copy of {m.module}")
    path.write_text(text.replace(m.original, m.replacement))


def _tests_present(tests, root: Path) -> list[str]:
    """The mapped tests that exist in root: with --tests-from an older suite may lack some."""
    present = []
    for t in tests:
        file, _, test = t.partition("::")
        path = root / file
        if path.is_file() and (not test or f"def {test.split('[')[0]}(" in path.read_text()):
            present.append(t)
    return present


def make_copy(tests_from: Path | None) -> tuple[Path, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="lora-edu-mutant-"))
    copy = tmp / "repo"
    shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
    if tests_from is not None:
        shutil.rmtree(copy / "tests")
        shutil.copytree(tests_from, copy / "tests", ignore=IGNORE)
    return tmp, copy


def _env(copy: Path) -> dict:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the copy or the tree
    return env


def run_pytest(copy: Path, tests, timeout: float) -> tuple[int | None, str]:
    """(return code, or None on timeout; output) of pytest on tests inside copy."""
    cmd = [sys.executable, "-m", "pytest", *tests, *PYTEST_FLAGS, "--rootdir", str(copy)]
    proc = subprocess.Popen(cmd, cwd=copy, env=_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group, to end it whole
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started, nothing else
        out, _ = proc.communicate()
        return None, out


def imported_from(copy: Path) -> Path:
    """Where `import lora_edu` resolves inside copy, with the environment the tests get."""
    out = subprocess.run([sys.executable, "-c", "import lora_edu; print(lora_edu.__file__)"], cwd=copy,
                         env=_env(copy), capture_output=True, text=True, check=True).stdout
    return Path(out.strip()).resolve()


@dataclass
class Result:
    name: str
    module: str
    status: str  # killed, survived, timeout, error
    seconds: float
    detail: str  # the first failing test, or why it errored


def _first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return out.strip().splitlines()[-1] if out.strip() else ""


def run_mutant(m: Mutant, timeout: float, tests_from: Path | None, keep: bool = False,
               whole_files: bool = False) -> Result:
    start = time.monotonic()
    tmp, copy = make_copy(tests_from)
    try:
        apply(m, copy)
        tests = m.tests
        if whole_files:  # every test of each mapped file, not only the mapped ids
            tests = list(dict.fromkeys(t.split("::")[0] for t in tests))
        tests = _tests_present(tests, copy)
        if not tests:  # an older suite with none of the mapped tests: nothing can kill it
            return Result(m.name, m.module, "survived", time.monotonic() - start, "no mapped test exists")
        code, out = run_pytest(copy, tests, timeout)
        if code is None:
            status, detail = "timeout", f"over {timeout:.0f} s"
        elif code == 0:
            status, detail = "survived", ""
        elif code in (1, 2):  # 1: a test failed; 2: interrupted, e.g. the mutant broke an import
            status, detail = "killed", _first_failure(out)
        else:  # 3 internal error, 4 usage error, 5 no tests collected: the mapping is wrong
            status, detail = "error", f"pytest exit {code}: {out.strip()[-300:]}"
        return Result(m.name, m.module, status, time.monotonic() - start, detail)
    finally:
        if keep:
            print(f"{m.name}: kept {copy}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def preflight(selected, timeout: float, tests_from: Path | None) -> None:
    """The canary must be killed, and the unmutated copy must pass every selected test."""
    tmp, copy = make_copy(tests_from)
    try:
        where = imported_from(copy)
        if not where.is_relative_to(copy.resolve()):
            raise MutantError(f"the copy imports lora_edu from {where}, not from the copy {copy}")
        union = list(dict.fromkeys(t for m in selected for t in _tests_present(m.tests, copy)))
        print(f"clean run of {len(union)} test sets on the unmutated copy ...", file=sys.stderr, flush=True)
        code, out = run_pytest(copy, union, timeout=max(timeout, 1800))
        if code != 0:
            raise MutantError(f"the unmutated copy fails its tests (exit {code}), so no kill would mean "
                              f"anything:\n{out[-3000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    canary = run_mutant(CANARY, timeout, tests_from)
    if canary.status != "killed":
        raise MutantError(f"the canary {canary.status}: the tests did not import the copy's lora_edu")
    print("canary killed: the tests import the copy's lora_edu", file=sys.stderr, flush=True)


def select(patterns) -> list[Mutant]:
    if not patterns:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(m.name, p) for m in MUTANTS)]
    if unknown:
        raise MutantError(f"no mutant matches {unknown}; see --list")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants (checked against the tree) and stop")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run the mutants with this name (a glob such as 'quant.*' works); repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    parser.add_argument("--tests-from", type=Path, help="run this tests folder instead of the tree's (an older suite)")
    parser.add_argument("--no-preflight", action="store_true", help="skip the canary and the clean run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep each mutant's copy for a look")
    parser.add_argument("--whole-files", action="store_true",
                        help="run whole mapped files instead of the mapped test ids (slower, for an older suite)")
    args = parser.parse_args(argv)

    try:
        check(MUTANTS + [CANARY], tests_root=args.tests_from)
        selected = select(args.only)
        if args.list:
            for m in selected:
                print(f"{m.name:<38} {m.module:<34} {m.description}")
                print(f"{'':<38} tests: {' '.join(m.tests)}")
            print(f"{len(selected)} mutants")
            return 0
        if not args.no_preflight:
            preflight(selected, args.timeout, args.tests_from)
        results = {}
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_mutant, m, args.timeout, args.tests_from, args.keep, args.whole_files): m
                       for m in selected}
            for future in futures:  # in list order; each waits for its own mutant only
                r = future.result()
                results[r.name] = r
                print(f"[{len(results)}/{len(selected)}] {r.name}: {r.status} ({r.seconds:.0f} s) {r.detail}",
                      file=sys.stderr, flush=True)
    except MutantError as error:
        print(f"mutate.py: {error}", file=sys.stderr)
        return 2

    ordered = [results[m.name] for m in selected]
    print(f"\n{'mutant':<38} {'module':<34} {'result':<9} {'s':>5}")
    for r in ordered:
        print(f"{r.name:<38} {r.module.removeprefix('lora_edu/'):<34} {r.status:<9} {r.seconds:>5.0f}")
    killed = sum(r.status == "killed" for r in ordered)
    alive = [r.name for r in ordered if r.status != "killed"]
    print(f"\nscore: {killed}/{len(ordered)} killed ({100 * killed / len(ordered):.0f}%)")
    if alive:
        print("not killed: " + ", ".join(f"{r.name} ({r.status})" for r in ordered if r.status != "killed"))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in ordered], indent=1))
    return 1 if any(r.status == "error" for r in ordered) else 0


if __name__ == "__main__":
    sys.exit(main())
