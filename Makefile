# Caddy Token Broker. `make run` starts the sidecar against the local sandbox;
# `make test` runs every test (unit, integration, adapt fixtures, xcaddy build).

GO            ?= go
BIN           ?= bin
CADDY_VERSION ?= v2.11.9
XCADDY        ?= $(GO) tool xcaddy

# The embedded default: sandbox on 127.0.0.1:9080, sidecar on 127.0.0.1:8080.
SANDBOX_ADDR   ?= 127.0.0.1:9080
export SANDBOX_URL    ?= http://$(SANDBOX_ADDR)
export NUAPAY_API_KEY ?= sandbox-partner-key

# Fuzz targets run by `make test`, each for FUZZTIME (package:target).
FUZZTIME      ?= 8s
FUZZ_TARGETS  := ./config:FuzzParse ./broker/nuapay:FuzzParseToken ./broker/nuapay:FuzzParseError \
                 ./broker/oauth:FuzzTokenResponse ./module:FuzzMerchantSelector

.PHONY: all build run test fuzz xcaddy fmt vet clean

all: build

build:
	$(GO) build -o $(BIN)/caddy ./cmd/caddy
	$(GO) build -o $(BIN)/sandbox ./cmd/sandbox

# Starts the sandbox in the background and Caddy in the foreground; Ctrl-C
# stops Caddy, and the trap stops the sandbox by its process id.
run: build
	@$(BIN)/sandbox -listen $(SANDBOX_ADDR) -api-key "$(NUAPAY_API_KEY)" & sandbox=$$!; \
	trap 'kill $$sandbox 2>/dev/null' EXIT INT TERM; \
	echo "sandbox on $(SANDBOX_URL) (pid $$sandbox); try:"; \
	echo "  curl -s -H 'X-Merchant-Id: acme' http://127.0.0.1:8080/tpp/payments"; \
	$(BIN)/caddy run --config Caddyfile --adapter caddyfile

test: vet
	$(GO) test -race -count=1 ./...
	$(MAKE) fuzz

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

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: run make fmt'; exit 1; }

clean:
	rm -rf $(BIN)

# Hot-path Go benchmarks, then the end-to-end comparison on loopback (direct
# upstream, reverse_proxy with a static header, the sidecar), cold burst,
# steady load with 10 s tokens and heap per token; it prints the ratios.
# About 3 minutes; the results are recorded in BENCHMARKS.md.
.PHONY: bench
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 3 ./broker ./module
	$(GO) run ./integration/loadtest
