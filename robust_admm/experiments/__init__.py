"""Experiments: the application built on the library. Configs (`config_base`, `validation`,
`migrate`), the workdir's layout (`workdir`), a run of a program in a workdir (`run`,
`inherit`), evaluating a finished run (`evaluate`), studies over many runs (`study`,
`study_config`), reports (`report`) and exports (`export`, `shrink`, `onnx_export`)."""
