"""The applications built on the library, one module each: what a command of ``ovlabel`` runs beyond glue.

``demo`` (generate, label, evaluate, report), ``postprocess`` (re-threshold cached heatmaps), ``calibrate``
(search the post-processing settings), ``benchmarks`` (the papers' benchmarks), ``train_shapes`` (the
shipped model's training) and ``export_onnx`` (the ONNX export command). They import the library's rooms;
no room of the library imports them.
"""
