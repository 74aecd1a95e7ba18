# Two commands for a new user: `make demo` and `make test` (both run set-up).
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/.cache/bin:$(PATH)

.PHONY: setup test unit demo bench build clean

setup:
	@tools/setup.sh

# Everything (what CI runs, .ci/run): the kernel tests in namespaces, the bundle's build and install.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# The fast tier: no root, no kernel, no build (markers in pyproject.toml).
# As root it runs set-up first, as `test` does; without root it needs the
# venv a root `make setup` made once.
unit:
	@if [ "$$(id -u)" = 0 ]; then tools/setup.sh; \
	elif [ ! -x "$(PY)" ]; then echo "make unit: run 'make setup' as root once" >&2; exit 1; fi
	$(PY) -m pytest -q -p no:cacheprovider -m "not kernel and not build" tests

demo: setup
	@tools/demo.sh

# matplotlib (the page's plots) comes from the `bench` extra, installed like `build`'s below.
bench: setup
	@stamp="$(VENV)/.bench-installed-$$(sha1sum pyproject.toml | cut -c1-12)"; \
	if [ ! -e "$$stamp" ]; then \
	    $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[bench]' && touch "$$stamp"; fi
	$(PY) -m bench.run

# dist/cni-fan/: the bundle (cni-fan, fan-client, fan, fan-ipam; no Python needed on the node).
# build.spec compiles fan-client (native/build.sh: needs a C compiler, which setup installs).
# PyInstaller comes from the `build` extra; the project stays installed editable.
build: setup
	@stamp="$(VENV)/.build-installed-$$(sha1sum pyproject.toml | cut -c1-12)"; \
	if [ ! -e "$$stamp" ]; then \
	    $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[build]' && touch "$$stamp"; fi
	$(VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN build.spec
	@echo "build: dist/cni-fan/ ($$(cat dist/cni-fan/BUILD-ID)); install the plugins with dist/cni-fan/cni-fan install --bin-dir DIR"

clean:
	rm -rf build dist cni_fan/native
