# Two commands for a new user: `make demo` and `make test` (both run set-up).
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/.cache/bin:$(PATH)

.PHONY: setup test unit demo bench build clean

setup:
	@tools/setup.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not kernel" tests

demo: setup
	@tools/demo.sh

# matplotlib (the page's plots) comes from the `bench` extra, installed like `build`'s below.
bench: setup
	@stamp="$(VENV)/.bench-installed-$$(sha1sum pyproject.toml | cut -c1-12)"; \
	if [ ! -e "$$stamp" ]; then \
	    $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[bench]' && touch "$$stamp"; fi
	$(PY) -m bench.run

# dist/cni-fan/: the bundle (cni-fan, fan, fan-ipam; no Python needed on the node).
# PyInstaller comes from the `build` extra; the project stays installed editable.
build: setup
	@stamp="$(VENV)/.build-installed-$$(sha1sum pyproject.toml | cut -c1-12)"; \
	if [ ! -e "$$stamp" ]; then \
	    $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[build]' && touch "$$stamp"; fi
	$(VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN build.spec
	@echo "build: dist/cni-fan/ ($$(cat dist/cni-fan/BUILD-ID)); install the plugins with dist/cni-fan/cni-fan install --bin-dir DIR"

clean:
	rm -rf build dist
