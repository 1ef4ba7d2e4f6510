"""Results in SAEBench's JSON schema (``sae_bench/evals/*/eval_output.py``, v0.6), so saekit's numbers sit
beside published ones: ``eval_type_id``, ``eval_config``, ``eval_id``, ``datetime_epoch_millis``,
``eval_result_metrics`` (categories of flat metrics), ``eval_result_details``, ``sae_bench_commit_hash``,
``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version``, ``sae_cfg_dict`` and
``eval_result_unstructured``.

saekit is not SAEBench: ``sae_bench_commit_hash`` reads ``"saekit-<version>"``, the SAELens fields are
null, metrics SAEBench defines but saekit does not compute are null, and saekit's extras (PCA baselines,
per-letter split latents, explanations, ...) go in ``eval_result_unstructured``. One file per
evaluation, ``RUN_DIR/eval_<eval_type_id>.json``.
"""
from __future__ import annotations

import re
import time
import uuid

EVAL_TYPES = {"core": "core", "absorption": "absorption_first_letter", "probing": "sparse_probing",
              "interp": "autointerp"}
SAEBENCH_KS = (1, 2, 5, 10, 20, 50, 100)


def file_name(suite: str) -> str:
    return f"eval_{EVAL_TYPES[suite]}.json"


def sae_cfg_dict(model, manifest: dict, hook: str) -> dict:
    """The SAE's config in SAELens's field names (``architecture`` is saekit's kind)."""
    layer = re.match(r"blocks\.(\d+)\.", hook)
    return {"architecture": model.kind, "d_in": model.d_in, "d_sae": model.n_latents,
            "hook_name": hook, "hook_layer": int(layer.group(1)) if layer else None,
            "model_name": manifest.get("model"), "context_size": manifest.get("context_size"),
            "dtype": "float32", "device": str(model.device), "dataset_path": manifest.get("corpus"),
            "prepend_bos": bool(manifest.get("tokenizer", {}).get("prefix_ids")),
            "normalize_activations": "none", "saekit_config": _plain(model.cfg)}


def _plain(cfg) -> dict:
    from saekit.schema import to_dict

    return to_dict(cfg)


def output(suite: str, eval_config: dict, metrics: dict, details: list, sae_cfg: dict,
           unstructured=None) -> dict:
    from saekit import __version__

    return {"eval_type_id": EVAL_TYPES[suite], "eval_config": eval_config, "eval_id": str(uuid.uuid4()),
            "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
            "eval_result_details": details, "sae_bench_commit_hash": f"saekit-{__version__}",
            "sae_lens_id": None, "sae_lens_release_id": None, "sae_lens_version": None,
            "sae_cfg_dict": sae_cfg, "eval_result_unstructured": unstructured}


def _common(cfg, manifest: dict) -> dict:
    return {"model_name": manifest.get("model"), "random_seed": cfg.seed, "llm_dtype": "float32",
            "llm_batch_size": cfg.downstream_batch_sequences}


def core(result: dict, cfg, manifest: dict, sae_cfg: dict) -> dict:
    rec, down = result["reconstruction"], result.get("downstream") or {}
    causal = down.get("kind") == "causal"
    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": (_recovered(down["kl_clean_zero_ablated"], down["kl_clean_spliced"]) if causal else None),
            "kl_div_with_ablation": down.get("kl_clean_zero_ablated"),
            "kl_div_with_sae": down.get("kl_clean_spliced")},
        "model_performance_preservation": {
            "ce_loss_score": down.get("ce_loss_recovered"), "ce_loss_with_ablation": down.get("ce_zero_ablated"),
            "ce_loss_with_sae": down.get("ce_spliced"), "ce_loss_without_sae": down.get("ce_clean")},
        "reconstruction_quality": {"explained_variance": rec["explained_variance"],
                                   "explained_variance_legacy": None, "mse": rec["mse_per_element"],
                                   "cossim": rec["cosine"]},
        "shrinkage": {"l2_norm_in": None, "l2_norm_out": None, "l2_ratio": None,
                      "relative_reconstruction_bias": None},
        "sparsity": {"l0": rec["l0"], "l1": None},
        "token_stats": {"total_tokens_eval_reconstruction": rec["tokens"],
                        "total_tokens_eval_sparsity_variance": rec["dead_window_tokens"]},
        "misc_metrics": {"freq_over_1_percent": None, "freq_over_10_percent": None,
                         "normalized_freq_over_1_percent": None, "normalized_freq_over_10_percent": None,
                         "average_max_encoder_cosine_sim": None, "average_max_decoder_cosine_sim": None,
                         "frac_alive": 1.0 - rec["dead_fraction"]},
    }
    config = {**_common(cfg, manifest), "dataset": manifest.get("corpus"),
              "context_size": manifest.get("context_size"), "n_eval_reconstruction_batches": None,
              "n_eval_sparsity_variance_batches": None, "compute_kl": causal, "compute_ce_loss": causal,
              "exclude_special_tokens_from_reconstruction": not manifest.get("keep_special_tokens", False)}
    extras = {"fvu": rec["fvu"], "dead_fraction": rec["dead_fraction"], "dense_fraction": rec["dense_fraction"],
              "downstream": down or None}
    return output("core", config, metrics, [], sae_cfg, extras)


def _recovered(ablated: float, spliced: float) -> float | None:
    return (ablated - spliced) / ablated if ablated else None


def absorption(res: dict, cfg, manifest: dict, sae_cfg: dict) -> dict:
    from saekit.evaluation import absorption as A

    metrics = {"mean": {"mean_absorption_fraction_score": res["mean_absorption_fraction"],
                        "mean_full_absorption_score": res["mean_full_absorption"],
                        "mean_num_split_features": res["mean_num_split_features"],
                        "std_dev_absorption_fraction_score": res["std_absorption_fraction"],
                        "std_dev_full_absorption_score": res["std_full_absorption"],
                        "std_dev_num_split_features": res["std_num_split_features"]}}
    keys = ("first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
            "num_probe_true_positives", "num_split_features")
    details = [{k: d[k] for k in keys} for d in res["letters"]]
    config = {**_common(cfg, manifest), "f1_jump_threshold": A.F1_JUMP, "max_k_value": res["max_k"],
              "prompt_template": cfg.absorption_templates[0], "prompt_token_pos": None,
              "k_sparse_probe_l1_decay": None, "k_sparse_probe_batch_size": None,
              "k_sparse_probe_num_epochs": None, "min_GT_probe_f1": res["min_probe_f1"], "min_feats_for_eval": 1,
              "eval_k_sparse_probe_batch_size": None, "precalc_k_sparse_probe_sae_acts": True,
              "prompt_templates": list(cfg.absorption_templates), "words": res.get("words"),
              "latent_ranking": "mean difference"}
    extras = {"letters": res["letters"], "letters_skipped": res["letters_skipped"], "probe_f1": res["probe_f1"]}
    return output("absorption", config, metrics, details, sae_cfg, extras)


def probing(res: dict, cfg, manifest: dict, sae_cfg: dict) -> dict:
    def block(prefix: str, row: dict) -> dict:
        out = {f"{prefix}_test_accuracy": row.get(f"{prefix}_test_accuracy")}
        out.update({f"{prefix}_top_{k}_test_accuracy": row.get(f"{prefix}_top_{k}_test_accuracy")
                    for k in SAEBENCH_KS})
        return out

    metrics = {"llm": block("llm", res), "sae": block("sae", res)}
    details = [{"dataset_name": t["dataset_name"], **block("llm", t), **block("sae", t)} for t in res["tasks"]]
    config = {**_common(cfg, manifest), "dataset_names": [t["dataset_name"] for t in res["tasks"]],
              "probe_train_set_size": cfg.probing_examples - cfg.probing_examples // 5,
              "probe_test_set_size": cfg.probing_examples // 5, "context_length": manifest.get("context_size"),
              "sae_batch_size": cfg.batch_tokens, "k_values": list(res["k"]), "lower_vram_usage": False}
    extras = {"pca": {k: v for k, v in res.items() if k.startswith("pca_")}, "tasks": res["tasks"],
              "tasks_skipped": res["tasks_skipped"]}
    return output("probing", config, metrics, details, sae_cfg, extras)


def interp(res: dict, cfg, manifest: dict, sae_cfg: dict) -> dict:
    from saekit.evaluation import autointerp as I

    metrics = {"autointerp": {"autointerp_score": res["autointerp_score"],
                              "autointerp_std_dev": res["autointerp_std_dev"]}}
    config = {**_common(cfg, manifest), "n_latents": cfg.interp_latents, "override_latents": None,
              "dead_latent_threshold": None, "dataset_name": manifest.get("corpus"),
              "llm_context_size": manifest.get("context_size"), "buffer": cfg.interp_context_tokens,
              "no_overlap": True, "act_threshold_frac": I.THRESHOLD_FRAC, "total_tokens": res["rows"][1] - res["rows"][0],
              "scoring": True, "max_tokens_in_explanation": I.MAX_NGRAMS, "use_demos_in_explanation": False,
              "n_top_ex_for_generation": I.TOP_EXPLAIN, "n_iw_sampled_ex_for_generation": 0,
              "n_top_ex_for_scoring": I.TOP_SCORE, "n_random_ex_for_scoring": I.RANDOM_SCORE,
              "n_iw_sampled_ex_for_scoring": 0, "explainer": res["explainer"],
              "explainer_model": cfg.interp_model if res["explainer"] == "openai" else None,
              "scorer": "n-gram presence (balanced accuracy)"}
    return output("interp", config, metrics, res["latents"], sae_cfg,
                  {"latents_scored": res["latents_scored"], "latents_eligible": res["latents_eligible"]})


WRITERS = {"core": core, "absorption": absorption, "probing": probing, "interp": interp}
