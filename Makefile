# kiln — top-level tasks. `make demo` and `make test` do all set-up on a fresh Debian/Ubuntu host.
SHELL := /bin/bash
CARGO ?= cargo
DATA_DIR ?= $(CURDIR)/.kiln-data
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/agent/kiln-agent
KILN := target/release/kiln
export KILN_DATA_DIR := $(DATA_DIR)

.PHONY: all deps build agent images image-tiny image-base demo test test-unit test-swap test-images bench fuzz soak reliability lint fmt clean install

all: build

deps:
	@bash scripts/install-deps.sh

agent:
	@echo "==> building the static guest agent"
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build -p kiln-agent --profile agent --target $(AGENT_TARGET)

build: agent
	@echo "==> building kiln"
	$(CARGO) build --release -p kiln-cli

IMAGE_INPUTS := $(AGENT_BIN) $(wildcard crates/kiln-image/src/*.rs) $(wildcard images/*.sh)

# An image is rebuilt when the guest agent or the image builder changed since it was built.
image-tiny: build
	@$(MAKE) --no-print-directory $(DATA_DIR)/images/tiny/image.json

image-base: build
	@$(MAKE) --no-print-directory $(DATA_DIR)/images/base/image.json

$(DATA_DIR)/images/%/image.json: $(IMAGE_INPUTS)
	$(KILN) image build $* --force --agent $(AGENT_BIN)

images: image-tiny image-base

demo: deps images
	@bash scripts/demo.sh

test: deps images
	@bash scripts/test.sh

# 50 API clients for 10 minutes against real VMs (KILN_LOAD_SECS overrides the time).
soak: build image-tiny
	KILN_TEST_IMAGES=$(DATA_DIR)/images $(CARGO) test --release -p kiln-cli --test concurrent_clients -- --ignored --nocapture

# Runs the fault tests (and a 150-step model walk; KILN_MODEL_STEPS overrides) and rewrites the table in
# docs/reliability.md.
reliability: build image-tiny
	KILN_TEST_IMAGES=$(DATA_DIR)/images KILN_MODEL_STEPS=$${KILN_MODEL_STEPS:-150} KILN_MODEL_SEED=$${KILN_MODEL_SEED:-random} bash scripts/reliability-report.sh

# Memory-delta capture with guest RAM in host swap: turns on a 256 MiB swap file for the test's length.
test-swap: build image-tiny
	KILN_TEST_IMAGES=$(DATA_DIR)/images $(CARGO) test --release -p kiln-cli --test delta -- --ignored --nocapture captures_stay_exact_with_guest_ram_in_host_swap

test-images:
	$(CARGO) test --release -p kiln-image --test boot -- --ignored --nocapture

test-unit:
	$(CARGO) test --workspace --lib --bins

fuzz: deps image-tiny
	@bash scripts/fuzz.sh

bench: deps image-tiny
	@bash bench/run.sh $(ARGS)

# Installs kiln on a host: the binary, the guest agent, the built images (in the service's data
# directory), the systemd unit and a config file (kept if one is there). DESTDIR stages it elsewhere.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/kiln
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/kiln
STATEDIR ?= /var/lib/kiln
install:
	@test -x $(KILN) -a -x $(AGENT_BIN) || { echo "run 'make build images' first"; exit 1; }
	@test -f $(DATA_DIR)/images/tiny/image.json || { echo "no images in $(DATA_DIR)/images: run 'make images' first"; exit 1; }
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	install -d -m 0711 $(DESTDIR)$(STATEDIR) $(DESTDIR)$(STATEDIR)/images
	install -m 0755 $(KILN) $(DESTDIR)$(BINDIR)/kiln
	install -m 0755 $(AGENT_BIN) $(DESTDIR)$(LIBDIR)/kiln-agent
	for img in $(DATA_DIR)/images/*/; do \
	  name=$$(basename $$img); test -f $$img/image.json || continue; \
	  rm -rf $(DESTDIR)$(STATEDIR)/images/.$$name.new; \
	  cp -a $$img $(DESTDIR)$(STATEDIR)/images/.$$name.new && \
	  rm -rf $(DESTDIR)$(STATEDIR)/images/$$name && \
	  mv $(DESTDIR)$(STATEDIR)/images/.$$name.new $(DESTDIR)$(STATEDIR)/images/$$name || exit 1; \
	done
	sed 's|@BINDIR@|$(BINDIR)|g' contrib/kiln.service > $(DESTDIR)$(UNITDIR)/kiln.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/kiln.service
	test -e $(DESTDIR)$(CONFDIR)/config.toml || install -m 0644 contrib/config.toml $(DESTDIR)$(CONFDIR)/config.toml
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null; then systemctl daemon-reload || true; fi
	@echo "installed; start it with: systemctl enable --now kiln"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
