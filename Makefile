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

bench: setup
	$(PY) -m bench.run

build: setup
	$(VENV)/bin/pip install -q --disable-pip-version-check '.[build]'
	$(VENV)/bin/pyinstaller --noconfirm --clean build.spec

clean:
	rm -rf build dist
