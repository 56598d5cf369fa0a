"""Hand-written mutants (issue 15 onwards): apply one at a time, run the tests that must catch it, restore.

Each entry is a wrong version listed in a test file's comments (id, file, exact text, wrong text, tests).
Prints CAUGHT or SURVIVED per mutant; PATTERN NOT FOUND means the code moved on and the entry needs
updating. Usage: .venv/bin/python scripts/mutants.py [id ...]   (a few seconds per mutant)
"""
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
M = [
 ("stage-section-ignored", "rescomp/pipeline.py", "changed = other_settings(run_dir, cfg, section)", "changed = other_settings(run_dir, cfg, None)",
  "tests/test_workflow.py::test_a_changed_stage_setting_is_refused_naming_the_key"),
 ("keys-not-named", "rescomp/pipeline.py", "holds a run with other settings: {', '.join(changed)}", "holds a run with other settings: a different config",
  "tests/test_workflow.py::test_the_training_keys_that_differ_are_named"),
 ("no-probe", "rescomp/models/__init__.py", "            model(torch.zeros(1, 3, image_size, image_size))", "            pass",
  "tests/test_workflow.py::test_a_model_that_cannot_run_is_one_line_and_leaves_nothing"),
 ("failed-run-keeps-folder", "rescomp/pipeline.py", "            shutil.rmtree(run_dir, ignore_errors=True)\n        raise", "            pass\n        raise",
  "tests/test_workflow.py::test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder"),
 ("failed-run-removes-checkpoints", "rescomp/pipeline.py", "    except BaseException:\n        if not resumable(run_dir):", "    except BaseException:\n        if True:",
  "tests/test_workflow.py::test_a_run_that_fails_after_a_checkpoint_keeps_it"),
 ("one-seed-only", "rescomp/config.py", "                for s in dict.fromkeys(self.seeds)]", "                for s in list(dict.fromkeys(self.seeds))[:1]]",
  "tests/test_workflow.py::test_seeds_run_in_their_own_folders_and_the_report_gives_mean_and_sd"),
 ("population-sd", "rescomp/report.py", "/ (len(tops) - 1)) ** 0.5", "/ len(tops)) ** 0.5",
  "tests/test_report.py::test_seeds_of_one_row_become_its_mean_and_sample_sd"),
 ("not-interleaved", "rescomp/measure.py", "        while rounds < repeats or (max_spread is not None and not spread_ok() and rounds < 20 * repeats\n                                   and time.perf_counter() - start < max_seconds):\n            for name, (m, xi) in runs.items():\n                t0 = time.perf_counter()\n                m(xi)\n                times[name].append((time.perf_counter() - t0) * 1e3)\n            rounds += 1",
  "        for name, (m, xi) in runs.items():\n            rounds = 0\n            while rounds < repeats or (max_spread is not None and _iqr(times[name] or [0]) > max_spread * statistics.median(times[name] or [1]) and rounds < 20 * repeats):\n                t0 = time.perf_counter()\n                m(xi)\n                times[name].append((time.perf_counter() - t0) * 1e3)\n                rounds += 1",
  "tests/test_measure.py::test_models_are_timed_interleaved_until_the_spread_is_small tests/test_measure.py::test_a_network_is_timed_interleaved_with_its_reference"),
 ("spread-ignored", "rescomp/measure.py", "while rounds < repeats or (max_spread is not None", "while rounds < repeats or (False and max_spread is not None",
  "tests/test_measure.py::test_models_are_timed_interleaved_until_the_spread_is_small"),
 ("noise-flag-inverted", "rescomp/measure.py", "            abs(f - q) <= (base[", "            abs(f - q) > (base[",
  "tests/test_measure.py::test_int8_speed_up_within_the_noise_is_flagged"),
 ("reference-not-interleaved", "rescomp/measure.py", "    models = {\"m\": (model, cfg.channels_last)} | ({\"ref\": (reference, cfg.channels_last)} if reference is not None else {})\n    lat = _latency_row(models, image_size, cfg, runtimes=models)",
  "    lat = _latency_row({\"m\": (model, cfg.channels_last)}, image_size, cfg, runtimes=(\"m\",))\n    if reference is not None:\n        lat |= _latency_row({\"ref\": (reference, cfg.channels_last)}, image_size, cfg, runtimes=(\"ref\",))",
  "tests/test_measure.py::test_a_network_is_timed_interleaved_with_its_reference"),
 ("prune-no-reference", "rescomp/prune_run.py", "reference=unpruned if step else None", "reference=None",
  "tests/test_prune.py::test_prune_end_to_end_and_report"),
 ("project-root-ignored", "rescomp/config.py", "        if (d / \"pyproject.toml\").exists() or (d / \".git\").exists():\n            return d", "        pass",
  "tests/test_workflow.py::test_runs_are_located_by_out_dir_not_by_the_shells_folder"),
 ("cli-paths-not-rebased", "rescomp/config.py", "            node[key[-1]] = os.path.relpath(Path.cwd() / value, root)", "            pass",
  "tests/test_workflow.py::test_runs_are_located_by_out_dir_not_by_the_shells_folder"),
 ("md-marks-dirty", "rescomp/provenance.py", ", \":!*.md\"]", "]",
  "tests/test_report.py::test_the_commit_stamp_is_dirty_for_code_and_config_changes_only"),
 ("one-line-through-archs", "rescomp/report.py", "    several = len({str(arch(r)) for r in rows}) > 1", "    several = False",
  "tests/test_report.py::test_a_plot_has_a_title_its_data_and_budget_and_one_legend_entry_per_curve_with_points"),
 ("empty-legend-entry", "rescomp/report.py", "                handles.setdefault(name, line)", "                handles.setdefault(name, line)\n            handles.setdefault(name, None) if False else ax.plot([], [], label=name)",
  "tests/test_report.py::test_a_plot_has_a_title_its_data_and_budget_and_one_legend_entry_per_curve_with_points"),
 ("sorted-by-x", "rescomp/report.py", "            pts = [(r[key] * scale, r[\"top1\"]) for r in curve if r.get(key) is not None and r.get(\"top1\") is not None]",
  "            pts = sorted((r[key] * scale, r[\"top1\"]) for r in curve if r.get(key) is not None and r.get(\"top1\") is not None)",
  "tests/test_report.py::test_a_plot_has_a_title_its_data_and_budget_and_one_legend_entry_per_curve_with_points"),
 ("one-wide-table", "rescomp/report.py", "        for part in split_columns(keys):", "        for part in split_columns(keys, limit=99):",
  "tests/test_report.py::test_each_table_fits_a_screen_and_its_columns_belong_to_its_rows"),
 ("ptq-in-epochs", "rescomp/report.py", "        out[\"method\"] = row[\"stage\"]", "        out[\"epochs\"] = row[\"stage\"]",
  "tests/test_report.py::test_each_table_fits_a_screen_and_its_columns_belong_to_its_rows"),
 ("stale-plot-kept", "rescomp/report.py", "            old.unlink()", "            pass",
  "tests/test_report.py::test_a_plot_these_rows_do_not_make_is_removed"),
 ("tb-no-purge", "rescomp/train.py", "purge_step=self.state.epoch + 1)", "purge_step=None)",
  "tests/test_workflow.py::test_tensorboard_logs_each_epoch_once_even_across_a_resume"),
 ("log-in-identity", "rescomp/config.py", "\"report\", \"log\", \"quantize\"", "\"report\", \"quantize\"",
  "tests/test_workflow.py::test_tensorboard_logs_each_epoch_once_even_across_a_resume"),
 ("tb-late-check", "rescomp/context.py", "        tensorboard_writer_class()  # a missing package", "        pass  # a missing package",
  "tests/test_workflow.py::test_tensorboard_without_the_package_is_one_line_and_makes_nothing"),
 ("ld-relative-not-interleaved", "rescomp/layer_drop_run.py", "smallest.get(f\"reference_{k}_ms_b{tb}\", full[f\"{k}_ms_b{tb}\"])", "full[f\"{k}_ms_b{tb}\"]",
  "tests/test_layer_drop.py::test_layer_drop_end_to_end_resumes_and_reports"),
 ("export-check-skipped", "rescomp/export.py", "        if not worst <= RTOL * scale:  # a NaN difference fails too", "        if False:",
  "tests/test_export.py::test_a_graph_that_disagrees_with_pytorch_is_not_kept"),
 ("export-batch-frozen", "rescomp/export.py", "                                    dynamic_shapes=dynamic_batch())", "                                    dynamic_shapes=None)",
  "tests/test_export.py::test_compressed_networks_export_with_any_batch_size"),
 ("export-missing-runtime-traceback", "rescomp/export.py", "    except ImportError as e:\n        raise ConfigError(f\"ONNX export", "    except KeyError as e:\n        raise ConfigError(f\"ONNX export",
  "tests/test_export.py::test_a_missing_runtime_is_one_line_and_writes_nothing"),
 ("export-int8-as-fp32", "rescomp/export.py", "    quantized = payload.get(\"kind\") == QUANT_FORMAT", "    quantized = False",
  "tests/test_export.py::test_an_fx_int8_checkpoint_is_refused"),
 ("export-int8-agreement-skipped", "rescomp/export.py", "        if not agree >= INT8_AGREEMENT:", "        if False:",
  "tests/test_export.py::test_a_pt2e_int8_model_exports_as_a_qdq_graph_that_agrees"),
 ("int8-folder-without-backend", "rescomp/pipeline.py", "    if stage in (\"ptq\", \"qat\") and cfg.quantize.backend != \"x86\":", "    if False:",
  "tests/test_quantize_pt2e.py::test_a_quantize_run_with_pt2e_end_to_end"),
 ("ort-other-threads", "rescomp/measure.py", "        return OrtForward(ort_session(path, threads))", "        return OrtForward(ort_session(path, None))",
  "tests/test_measure.py::test_onnxruntime_is_timed_beside_eager_with_the_same_threads"),
 ("fastest-is-slowest", "rescomp/measure.py", "row[f\"fastest_runtime_b{b}\"] = min(", "row[f\"fastest_runtime_b{b}\"] = max(",
  "tests/test_measure.py::test_the_fastest_runtime_is_the_one_with_the_lowest_median"),
 ("ort-separate-rounds", "rescomp/measure.py", "            stats = cpu_latency_stats(timed, image_size, b, threads=n, warmup=cfg.warmup, repeats=cfg.repeats,\n                                      max_spread=cfg.max_spread, max_seconds=cfg.max_seconds)",
  "            stats = {k: v for name in timed for k, v in cpu_latency_stats({name: timed[name]}, image_size, b, threads=n, warmup=cfg.warmup, repeats=cfg.repeats, max_spread=cfg.max_spread, max_seconds=cfg.max_seconds).items()}",
  "tests/test_measure.py::test_onnxruntime_is_timed_beside_eager_with_the_same_threads"),
 ("runtimes-without-eager", "rescomp/config.py", "        if \"eager\" not in v:", "        if False:",
  "tests/test_measure.py::test_onnxruntime_is_timed_beside_eager_with_the_same_threads"),
 ("ort-calibration-ignored", "rescomp/compress/quantize_ort.py", "    batches = [x.cpu().contiguous().numpy() for x in calibration]",
  "    batches = [0 * x.cpu().contiguous().numpy() for x in calibration]",
  "tests/test_quantize_ort.py::test_onnxruntime_int8_tracks_fp32_and_reloads_identically"),
 ("ort-reload-recalibrates", "rescomp/compress/quantize.py", "        return quantize_ort.load(payload[\"onnx\"]), payload",
  "        from rescomp.models import build_model\n        return quantize_ort.ptq(build_model(payload[\"arch\"]).eval(), cfg, [torch.randn(4, 3, payload[\"image_size\"], payload[\"image_size\"])], payload[\"image_size\"])[0], payload",
  "tests/test_quantize_ort.py::test_onnxruntime_int8_tracks_fp32_and_reloads_identically"),
 ("speedup-over-eager", "rescomp/measure.py", "        bc = _fastest(base, b)\n", "        bc = \"cpu\"\n",
  "tests/test_quantize_ort.py::test_a_speed_up_is_over_the_fastest_fp32_runtime"),
 ("ort-qat-accepted", "rescomp/config.py", "            if self.method == \"qat\":", "            if False:",
  "tests/test_quantize_ort.py::test_options_the_backend_cannot_honour_are_one_line"),
 ("ort-int8-under-pytorch-column", "rescomp/measure.py", "    int8 = {k.replace(\"_cpu_\", f\"_{col}_\"): v for k, v in lat[\"int8\"].items()}",
  "    int8 = lat[\"int8\"]", "tests/test_quantize_ort.py::test_a_quantize_run_in_onnxruntime_end_to_end"),
 ("pt2e-calibration-ignored", "rescomp/compress/quantize_pt2e.py", "            prepared(x.cpu().contiguous())", "            prepared(0 * x.cpu().contiguous())",
  "tests/test_quantize_pt2e.py::test_pt2e_int8_tracks_fp32_and_reloads_identically"),
 ("pt2e-reload-recalibrates", "rescomp/compress/quantize.py", "        return quantize_pt2e.load(payload[\"pt2\"]), payload",
  "        from rescomp.models import build_model\n        return quantize_pt2e.ptq(build_model(payload[\"arch\"]).eval(), cfg, [torch.randn(4, 3, payload[\"image_size\"], payload[\"image_size\"])], payload[\"image_size\"])[0], payload",
  "tests/test_quantize_pt2e.py::test_pt2e_int8_tracks_fp32_and_reloads_identically"),
 ("pt2e-fp32-eager-only", "rescomp/measure.py", "    if runtime and runtime not in cfg.runtimes:", "    if False:",
  "tests/test_quantize_pt2e.py::test_a_quantize_run_with_pt2e_end_to_end"),
 ("qat-run-as-ptq", "rescomp/pipeline.py", "    if qc.method == \"qat\":  # the config", "    if False:  # the config",
  "tests/test_quantize_pt2e.py::test_a_quantize_run_with_pt2e_end_to_end"),
 ("pt2e-qat-in-place", "rescomp/compress/quantize_pt2e.py", "    model = copy.deepcopy(model).cpu().train(qat)", "    model = model.cpu().train(qat)",
  "tests/test_quantize_pt2e.py::test_pt2e_qat_fine_tunes_a_copy_and_converts_what_it_learned"),
 ("pt2e-qat-bn-never-eval", "rescomp/compress/quantize_pt2e.py", "        (api.to_train if mode else api.to_eval)(self.program)", "        api.to_train(self.program)",
  "tests/test_quantize_pt2e.py::test_pt2e_qat_fine_tunes_a_copy_and_converts_what_it_learned"),
 ("pt2e-qat-converts-a-copy", "rescomp/compress/quantize_pt2e.py", "    return _converted(prepared.program, image_size)", "    return _converted(copy.deepcopy(prepared.program), image_size) if False else ptq(prepared.program, QuantizeConfig(backend=\"pt2e\"), [], image_size)[::2]",
  "tests/test_quantize_pt2e.py::test_pt2e_qat_fine_tunes_a_copy_and_converts_what_it_learned"),
 ("pt2e-unused-weights-kept", "rescomp/compress/quantize_pt2e.py", "        if name not in read:", "        if False:",
  "tests/test_quantize_pt2e.py::test_pt2e_int8_tracks_fp32_and_reloads_identically"),
 ("pt2e-8bit-without-vnni", "rescomp/compress/quantize.py", "    return not has_vnni() if cfg.backend == \"pt2e\" else", "    return False if cfg.backend == \"pt2e\" else",
  "tests/test_quantize_pt2e.py::test_auto_activation_width_keeps_int8_sums_exact"),
 ("ort-8bit-weights", "rescomp/compress/quantize_ort.py", "                            reduce_range=seven_bit_weights(cfg),", "                            reduce_range=False,",
  "tests/test_quantize_ort.py::test_seven_bit_weights_keep_a_saturating_conv_exact"),
 ("export-nan-passes", "rescomp/export.py", "                if not bool(torch.isfinite(theirs).all()):", "                if False:",
  "tests/test_export.py::test_nan_outputs_and_the_opset_written"),
 ("pruned-speedup-mixed-runtimes", "rescomp/measure.py", "        nc = bc if same_runtime else _fastest(new, b)", "        nc = _fastest(new, b)",
  "tests/test_measure.py::test_a_pruned_speed_up_compares_both_networks_on_one_runtime"),
 ("chain-source-ignored", "rescomp/runner.py", "            scfg = stage_config(cfg, step, name, source)", "            scfg = stage_config(cfg, step, name, None)",
  "tests/test_runner.py::test_a_chain_runs_end_to_end_and_resumes_inside_its_second_stage"),
 ("chain-entry-leaks", "rescomp/runner.py", "        done.append((run_dir, summary))\n", "        done.append((run_dir, summary))\n        cfg = scfg.model_copy(update={\"pipeline\": cfg.pipeline})\n",
  "tests/test_runner.py::test_a_chain_runs_end_to_end_and_resumes_inside_its_second_stage"),
 ("chain-checks-late", "rescomp/runner.py", "        step.stage.check(scfg)\n", "        pass\n",
  "tests/test_runner.py::test_a_chain_that_cannot_work_is_refused_before_anything_runs"),
 ("chain-takes-anything", "rescomp/runner.py", "        why = step.stage.refuses(traits) if i or not step.stage.first_only else None", "        why = None",
  "tests/test_runner.py::test_a_chain_that_cannot_work_is_refused_before_anything_runs tests/test_runner.py::test_layer_drop_needs_a_gated_network"),
 ("chain-prune-shares-of-config", "rescomp/prune_run.py", "    if pc.checkpoint:  # another network", "    if False:  # another network",
  "tests/test_runner.py::test_every_stage_composes_with_every_stage_that_takes_its_output"),
 ("transforms-in-spec-order", "rescomp/models/__init__.py", "        for key in sorted(named, key=lambda k: TRANSFORMS.get(k).order):", "        for key in named:",
  "tests/test_models.py::test_registered_transforms_apply_in_their_order"),
 ("builder-imports-techniques", "rescomp/models/__init__.py", "    if unknown:\n        keys = transform_keys()", "    if True:\n        keys = transform_keys()",
  "tests/test_models.py::test_the_builder_imports_no_technique_for_a_plain_network"),
 ("pt2e-source-lines-kept", "rescomp/compress/quantize_pt2e.py", "            node.meta.pop(key, None)", "            pass",
  "tests/test_quantize_pt2e.py::test_pt2e_int8_tracks_fp32_and_reloads_identically"),
 ("int8-size-is-file", "rescomp/measure.py", "    size = qmodel.tensor_bytes if runtime else", "    size = len(qmodel.model) if runtime else",
  "tests/test_quantize_ort.py::test_a_quantize_run_in_onnxruntime_end_to_end tests/test_quantize_pt2e.py::test_a_quantize_run_with_pt2e_end_to_end"),
]
only = set(sys.argv[1:])
survived = 0
for mid, f, old, new, test in M:
    if only and mid not in only:
        continue
    p = ROOT / f
    src = p.read_text()
    if src.count(old) != 1:
        print(f"{mid}: PATTERN NOT FOUND ({src.count(old)})", flush=True); continue
    p.write_text(src.replace(old, new))
    try:
        t0 = time.time()
        r = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:faulthandler", "-p", "no:cacheprovider", *test.split()],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        last = [line for line in r.stdout.splitlines() if line.strip()][-1:]
        survived += r.returncode == 0
        print(f"{mid}: {'CAUGHT' if r.returncode != 0 else 'SURVIVED'} ({time.time() - t0:.0f}s) {last}", flush=True)
    finally:
        p.write_text(src)
sys.exit(1 if survived else 0)
