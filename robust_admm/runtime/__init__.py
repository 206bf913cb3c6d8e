"""Runtime: where and how programs run and what they leave behind: the device mesh and
multi-host helpers (`parallel`), compiler options and compiled steps (`compiler`), host
memory (`host_memory`), checkpoints (`checkpoint`), logs and metrics (`logs`), claims on
shared folders (`claims`). Knows nothing of models, data or compression."""
