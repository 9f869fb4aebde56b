# The two commands of the README: `make demo` runs the main job, `make test` the
# whole test suite. Both create .venv on first use.
VENV ?= .venv
STAMP := $(VENV)/.bitscale-installed

.PHONY: demo test lint bench clean-venv

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/bitscale train --nproc 2 --model tiny --steps 30 --schedule both --ckpt-dir runs/demo/ckpt --ckpt-every 10 --metrics runs/demo/metrics.json --plot runs/demo/train.png

test: $(STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(VENV)/bin/bitscale bench run --quick
	$(VENV)/bin/bitscale bench report

lint: $(STAMP)
	$(VENV)/bin/ruff check .

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $@

clean-venv:
	rm -rf $(VENV)
