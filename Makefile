# Caddy Token Broker. `make run` starts the sidecar against the local sandbox;
# `make test` runs the linters and every test (unit, integration, adapt fixtures, xcaddy build).

GO            ?= go
BIN           ?= bin
CADDY_VERSION ?= v2.11.9
XCADDY        ?= $(GO) tool xcaddy

# The embedded default: sandbox on 127.0.0.1:9080, sidecar on 127.0.0.1:8080.
# The variables the sandbox registry reads are set here whatever the
# environment holds (an example's README exports SANDBOX_URL for its own
# sandbox, NUAPAY_API_KEY for the real Nuapay); `make run VAR=value` still
# sets one.
SANDBOX_ADDR   ?= 127.0.0.1:9080
export SANDBOX_URL    = http://$(SANDBOX_ADDR)
export NUAPAY_API_KEY = sandbox-partner-key
# The sandbox bank's consent site (the root Caddyfile's second site, on
# loopback) and its demo client's secret (examples/sandbox/merchants.toml).
SANDBOX_CONSENT_ADDR ?= 127.0.0.1:8081
export SANDBOX_CONSENT_SITE = http://$(SANDBOX_CONSENT_ADDR)
export SANDBOX_BANK_SECRET  = sandbox-bank-secret

# Fuzz targets run by `make test`, each for FUZZTIME (package:target).
# A count, not a duration: with a duration, go1.26's fuzz coordinator can
# fail a target with a bare "context deadline exceeded" when the time runs
# out (golang/go#75804, fixed in go1.27); seen here on FuzzParse. 20000
# inputs take 1-15 s a target on 2 CPUs.
FUZZTIME      ?= 20000x
FUZZ_TARGETS  := ./config:FuzzParse ./broker/nuapay:FuzzParseToken ./broker/nuapay:FuzzParseError \
                 ./broker/oauth:FuzzTokenResponse ./module:FuzzMerchantSelector

.PHONY: all build run validate test test-go rules lint fuzz xcaddy fmt vet clean image image-xcaddy

all: build

# -v lists each package as it is compiled: a first build (modules to
# download, Caddy to compile) takes 2-4 minutes, later ones seconds.
build:
	@echo "build: $(BIN)/caddy (a first build downloads modules and compiles Caddy: 2-4 minutes; then seconds)"
	$(GO) build -v -o $(BIN)/caddy ./cmd/caddy
	@echo "build: $(BIN)/sandbox"
	$(GO) build -v -o $(BIN)/sandbox ./cmd/sandbox

# Starts the sandbox in the background and Caddy in the foreground; Ctrl-C
# stops Caddy, and the trap stops the sandbox by its process id. Caddy starts
# once the sandbox listens (it writes its address to RUN_DIR/sandbox.addr);
# if the sandbox ends first (its address is taken, by another `make run` or
# anything else), make run ends with an error and Caddy never starts: it
# would share its ports silently with another make run's Caddy
# (SO_REUSEPORT). Both keep their state in RUN_DIR under the checkout
# (Caddy's data and config folders, the sandbox bank's refresh tokens), so a
# restart keeps the merchants' consent; `rm -rf .run` starts afresh.
RUN_DIR ?= .run
run: build
	@echo "run: state in $(RUN_DIR)/ (rm -rf $(RUN_DIR) to start afresh)"; \
	mkdir -p $(RUN_DIR)/data $(RUN_DIR)/config; \
	rm -f $(RUN_DIR)/sandbox.addr; \
	$(BIN)/sandbox -listen $(SANDBOX_ADDR) -state $(RUN_DIR)/sandbox \
		-addr-file $(RUN_DIR)/sandbox.addr \
		-bank-client "sandbox-bank-client:$(SANDBOX_BANK_SECRET)" \
		-bank-redirect-uris "$(SANDBOX_CONSENT_SITE)/consent/callback" & sandbox=$$!; \
	trap 'kill $$sandbox 2>/dev/null' EXIT INT TERM; \
	while [ ! -s $(RUN_DIR)/sandbox.addr ]; do \
		kill -0 $$sandbox 2>/dev/null || { \
			echo "run: the sandbox did not start on $(SANDBOX_ADDR) (its error is above): stop what listens there (another make run?) or set SANDBOX_ADDR"; \
			exit 1; }; \
		sleep 0.1; \
	done; \
	echo "sandbox on $(SANDBOX_URL) (pid $$sandbox); try:"; \
	echo "  curl -s -H 'X-Merchant-Id: acme' http://127.0.0.1:8080/tpp/payments"; \
	echo "merchant consent at the sandbox bank (hooli): get a consent link,"; \
	echo "  curl -s -X POST http://127.0.0.1:8080/consent/links -d '{\"merchant\":\"hooli\"}'"; \
	echo "open its \"url\" ($(SANDBOX_CONSENT_SITE)/consent/start?link=...) in a browser, press Approve, then:"; \
	echo "  curl -s -H 'X-Merchant-Id: hooli' http://127.0.0.1:8080/accounts"; \
	echo "  curl -s 127.0.0.1:2019/token_broker/consent/merchants"; \
	XDG_DATA_HOME="$(abspath $(RUN_DIR))/data" XDG_CONFIG_HOME="$(abspath $(RUN_DIR))/config" \
		$(BIN)/caddy run --config Caddyfile --adapter caddyfile

# Checks the root Caddyfile's merchant registry as `caddy token-broker
# validate` does, with the variables this Makefile exports for its {env.NAME}
# references (SANDBOX_URL, NUAPAY_API_KEY, ...), which a shell of its own
# does not have.
validate: build
	$(BIN)/caddy token-broker validate --config Caddyfile --adapter caddyfile

# The suite, the linters and the fuzz targets run side by side (the
# integration tests wait on processes more than they compute); each one's
# output is printed whole when it ends.
test: vet tools
	$(MAKE) --no-print-directory -j3 --output-sync=target test-go lint fuzz
	cd deploy/kubernetes && $(GO) vet ./... && $(GO) test -count=1 ./...
	$(MAKE) --no-print-directory rules

test-go:
	$(GO) test -race -count=1 -timeout 30m ./...

# The fleet tests start Debian's redis-server on a free loopback port;
# install it when missing (as root, or with sudo). The image test builds
# with Debian's podman.
# wrk runs in the benchmark driver's own test (and in `make bench`).
# The consent pages test drives Debian's chromium (headless).
# Debian's prometheus has promtool too: `make rules` runs it, and the
# dashboard test scrapes a sidecar with prometheus.
# The DPoP tests run a real authorization server, oidc-provider on Debian's
# Node.js (integration/dpopas): npm ci installs the versions its
# package-lock.json pins when node_modules does not hold them yet (the
# marker file holds the lock's SHA-256; the tests run npm ci too when it
# differs).
DPOPAS := integration/dpopas
tools:
	@missing=""; for t in redis-server wrk podman chromium prometheus; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing from Debian"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y $$missing; \
		else sudo apt-get update && sudo apt-get install -y $$missing; fi; \
	fi
	@cd $(DPOPAS) && want=$$(sha256sum package-lock.json | cut -d' ' -f1); \
	if [ "$$(cat node_modules/.dpopas-installed 2>/dev/null)" != "$$want" ]; then \
		echo "tools: npm ci in $(DPOPAS)"; \
		npm ci --prefer-offline --no-audit --no-fund && printf %s "$$want" > node_modules/.dpopas-installed; \
	fi

# The alerting rules of deploy/prometheus: promtool checks them and runs
# their unit tests (token-broker-alerts_test.yml).
RULES := deploy/prometheus/token-broker-alerts.yml
rules:
	@command -v promtool >/dev/null || { echo "make rules needs promtool: apt-get install -y prometheus (make tools does)"; exit 1; }
	promtool check rules $(RULES)
	promtool test rules $(RULES:.yml=_test.yml)

# Each fuzz target for a bounded time; the committed corpora in
# testdata/fuzz run as plain tests in `go test` too.
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
		$(GO) test -run='^$$' -fuzz="^$$name$$" -fuzztime=$(FUZZTIME) $$pkg || exit 1; \
	done

# Builds a Caddy with this plugin the way users do, with xcaddy.
xcaddy:
	$(XCADDY) build $(CADDY_VERSION) \
		--with github.com/tokenbroker/caddy-token-broker@v0.0.0=. \
		--output $(BIN)/caddy-xcaddy

# Container images (podman; PODMAN=docker works too). `make image` needs no
# registry: the static Caddy of this checkout (CGO_ENABLED=0) on `scratch`
# with this host's CA certificates (Containerfile.scratch), from the context
# $(BIN)/image. `make image-xcaddy` builds the Caddy way (Containerfile:
# xcaddy in the caddy:<version>-builder image, then the caddy image), which
# pulls both images.
PODMAN   ?= podman
IMAGE    ?= localhost/caddy-token-broker:dev
CA_CERTS ?= /etc/ssl/certs/ca-certificates.crt
image:
	@command -v $(firstword $(PODMAN)) >/dev/null || { echo "make image needs podman: apt-get install -y podman (make tools does)"; exit 1; }
	@echo "image: building $(BIN)/image/caddy (static, CGO_ENABLED=0)"
	rm -rf $(BIN)/image && mkdir -p $(BIN)/image/data $(BIN)/image/config
	CGO_ENABLED=0 $(GO) build -v -trimpath -o $(BIN)/image/caddy ./cmd/caddy
	cp $(CA_CERTS) $(BIN)/image/ca-certificates.crt
	@echo "image: $(PODMAN) build $(IMAGE)"
	$(PODMAN) build -f Containerfile.scratch -t $(IMAGE) $(BIN)/image

image-xcaddy:
	$(PODMAN) build -f Containerfile --build-arg CADDY_VERSION=$(CADDY_VERSION:v%=%) -t $(IMAGE) .

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: run make fmt'; exit 1; }

clean:
	rm -rf $(BIN)

# The linters, as go tools (go.mod), run by `make test`: staticcheck reports
# nothing; deadcode finds no function that even the tests do not reach, and
# no product function that only tests reach (outside the test-support
# packages of DEADCODE_TEST_SUPPORT); no product package imports unsafe or
# runtime/debug; module/ has at most 2 500 lines of product Go. Every step runs and says what it
# checks; any finding fails the target.
DEADCODE_TEST_SUPPORT := integration/optest integration/banktest integration/redistest integration/jwttest integration/configtest integration/clocktest integration/dpopas integration/dpoprs integration/dpoptest integration/brokertest
lint:
	@fail=0; \
	echo "lint: go tool staticcheck ./..."; \
	$(GO) tool staticcheck ./... || { echo "lint: FAIL staticcheck: fix the findings above"; fail=1; }; \
	echo "lint: go tool deadcode -test ./... (functions no program or test reaches)"; \
	if ! out=$$($(GO) tool deadcode -test ./...); then fail=1; \
	elif [ -n "$$out" ]; then echo "$$out"; echo "lint: FAIL deadcode -test: unreachable even from the tests, remove it"; fail=1; fi; \
	echo "lint: go tool deadcode ./... (product functions only tests reach; test-support packages excepted)"; \
	if ! out=$$($(GO) tool deadcode ./...); then fail=1; \
	else rest=$$(printf '%s\n' "$$out" | grep -v -E '^($(subst $(eval) ,|,$(DEADCODE_TEST_SUPPORT)))/' || true); \
	if [ -n "$$rest" ]; then echo "$$rest"; echo "lint: FAIL deadcode: product code only tests reach: move it into the tests or use it"; fail=1; fi; fi; \
	echo "lint: product packages (broker, config, module, internal) import neither unsafe nor runtime/debug"; \
	out=$$($(GO) list -f '{{.ImportPath}}: {{join .Imports " "}}' ./broker/... ./config/... ./module/... ./internal/... | grep -E ' (unsafe|runtime/debug)( |$$)' || true); \
	if [ -n "$$out" ]; then echo "$$out"; echo "lint: FAIL: a product package imports unsafe or runtime/debug: a plugin must not depend on the runtime's layout or change the collector"; fail=1; fi; \
	n=$$(find module -name '*.go' ! -name '*_test.go' | xargs cat | wc -l); \
	echo "lint: module/ is Caddy glue: $$n lines of product Go, at most 2500"; \
	if [ $$n -gt 2500 ]; then echo "lint: FAIL: module/ has $$n lines: move what is not Caddy glue into a package without a Caddy import"; fail=1; fi; \
	if [ $$fail = 0 ]; then echo "lint: ok"; else exit 1; fi

# The end-to-end comparison as separate processes (integration/bench): the
# sidecar and a plain Caddy with a static `header_up Authorization` (same
# binary, same 3 routes), one upstream, the sandbox token API, and wrk with a
# random merchant per request; 7 interleaved rounds of 5 s per server for 1,
# 1 000 and 100 000 merchants, plus start, reload, RSS and the Go heap figures,
# the reload of a registry of 10 files x 10 000 with one edited, and the
# wildcard case. About 6-8 minutes on
# 2 CPUs; BENCH_QUICK=1 (1 round of 2 s) smoke-tests it in about 3. Flags go
# in BENCH_FLAGS (e.g. BENCH_FLAGS='-merchants 1,1000 -rounds 9'). Installs
# wrk from Debian when missing. Then the fleet mode: BENCH_FLEET sidecars
# sharing one redis-server, mints per key per token lifetime and the latency
# of an L1 miss served from Redis. Then the DPoP comparison: CPU per request
# of a DPoP route for ES256, PS256 and EdDSA vs a bearer route vs the plain
# Caddy (about 3 minutes). Then the budget mode: sidecars and Redis
# spending a provider's rate_limit against a token API that answers 429 above
# it, with and without the budget (about 12 minutes). The figures go in
# BENCHMARKS.md.
BENCH_FLEET ?= 10
.PHONY: bench tools
bench: tools
	$(GO) build -o $(BIN)/bench ./integration/bench
	GO=$(GO) $(BIN)/bench -bin $(BIN) $(BENCH_FLAGS)
	GO=$(GO) $(BIN)/bench -bin $(BIN) -build=false -fleet $(BENCH_FLEET) $(BENCH_FLAGS)
	GO=$(GO) $(BIN)/bench -bin $(BIN) -build=false -dpop $(BENCH_FLAGS)
	GO=$(GO) $(BIN)/bench -bin $(BIN) -build=false -budget $(BENCH_FLAGS)
