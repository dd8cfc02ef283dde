package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
)

// The bank client of the DPoP comparison, registered at the token API
// helper's sandbox bank (tokenapi -bank-client); its secret comes from
// the environment.
const (
	dpopBenchClient = "bench-bank-client"
	bankSecretEnv   = "BENCH_BANK_SECRET"
	bankSecret      = "bench-bank-secret"
	bankTokenPath   = "/oauth2/token" // the sandbox bank's token endpoint
)

// dpopCase is one sidecar of the DPoP comparison: one merchant of the
// sandbox bank, with bearer tokens (alg "") or tokens bound to a new key
// of alg, each request sent through the token_broker_dpop transport.
type dpopCase struct {
	name, alg string
	srv       *server
	rounds    []round
}

// runDPoP is the DPoP mode (-dpop): the CPU per request of a route whose
// tokens are DPoP-bound (a proof signed per request) for each algorithm,
// against a bearer route of the same bank and the plain Caddy with a
// static header, each a separate process in front of the same upstream,
// one merchant, interleaved wrk rounds after a warm-up.
func runDPoP(o options) error {
	wrk, err := lookWrk()
	if err != nil {
		return err
	}
	e, self, cleanup, err := newEnv(o, "tb-bench-dpop-")
	if err != nil {
		return err
	}
	defer cleanup()
	if err := e.startTokenAPI(self, []string{bankSecretEnv + "=" + bankSecret}, "-orgs", "1", "-bank-client", dpopBenchClient); err != nil {
		return err
	}
	t0 := time.Now()
	if e.plain, err = e.startCaddy("plain", ""); err != nil {
		return err
	}
	if _, err := waitHTTP(e.plain.p, e.plain.url(), nil, t0, 5*time.Minute); err != nil {
		return err
	}

	cases := []*dpopCase{{name: "bearer"}, {name: "DPoP", alg: "ES256"}, {name: "DPoP", alg: "PS256"}, {name: "DPoP", alg: "EdDSA"}}
	for _, c := range cases {
		progress("DPoP comparison: start the %s %s sidecar", c.name, c.alg)
		if c.srv, err = e.startDPoPSidecar(c.alg); err != nil {
			return err
		}
		defer c.srv.p.stop()
		if _, err := waitHTTP(c.srv.p, c.srv.url(), nil, time.Now(), 5*time.Minute); err != nil {
			return err
		}
		if err := warm(c.srv.url(), 1, merchantID); err != nil {
			return fmt.Errorf("%s %s: %w", c.name, c.alg, err)
		}
	}
	script := filepath.Join(e.dir, "one-merchant.lua")
	if err := os.WriteFile(script, []byte(wrkScript(1)), 0o644); err != nil {
		return err
	}
	servers := []*server{e.plain}
	for _, c := range cases {
		servers = append(servers, c.srv)
	}
	progress("DPoP comparison: wrk warm-up and %d rounds", o.rounds)
	for _, s := range servers {
		if _, err := e.wrk(wrk, script, s, o.warmup); err != nil {
			return err
		}
	}
	var plain []round
	for i := range o.rounds {
		for j := range servers { // each round starts with another server
			s := servers[(i+j)%len(servers)]
			rd, err := e.wrk(wrk, script, s, o.round)
			if err != nil {
				return err
			}
			if s == e.plain {
				plain = append(plain, rd)
				continue
			}
			for _, c := range cases {
				if c.srv == s {
					c.rounds = append(c.rounds, rd)
				}
			}
		}
	}
	fmt.Print(dpopReport(machine(), e, cases, plain))
	return nil
}

// startDPoPSidecar starts a sidecar with one merchant (merchantID(0)) of
// the sandbox bank on one route: bearer tokens when alg is "", else
// tokens bound to a new key of alg and the route's reverse_proxy through
// the token_broker_dpop transport.
func (e *env) startDPoPSidecar(alg string) (*server, error) {
	name := "bearer"
	if alg != "" {
		name = "dpop-" + strings.ToLower(alg)
	}
	reg := fmt.Sprintf("[providers.bank]\ntype = \"oauth2\"\ntoken_url = %q\nclient_id = %q\nclient_secret = \"{env.%s}\"\n\n",
		e.tokenAPI+bankTokenPath, dpopBenchClient, bankSecretEnv)
	transport := ""
	if alg != "" {
		key, err := dpoptest.KeyPEM(alg)
		if err != nil {
			return nil, err
		}
		keyFile := filepath.Join(e.dir, name+".pem")
		if err := os.WriteFile(keyFile, key, 0o600); err != nil {
			return nil, err
		}
		reg += fmt.Sprintf("[providers.bank.dpop]\nkey = %q\n\n", keyFile)
		transport = " {\n\t\t\ttransport token_broker_dpop\n\t\t}"
	}
	reg += fmt.Sprintf("[merchants.%s]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n", merchantID(0))
	registry := filepath.Join(e.dir, name+".toml")
	if err := os.WriteFile(registry, []byte(reg), 0o644); err != nil {
		return nil, err
	}
	env := []string{bankSecretEnv + "=" + bankSecret, "XDG_DATA_HOME=" + filepath.Join(e.dir, "data"), "XDG_CONFIG_HOME=" + filepath.Join(e.dir, "config")}
	return e.startServer(name, env, func(port, admin int) string {
		return fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n\ttoken_broker {\n\t\tconfig %s\n\t}\n}\n\n"+
			"http://:%d {\n\tbind 127.0.0.1\n\thandle {\n\t\ttoken_broker\n\t\treverse_proxy %s%s\n\t}\n}\n",
			admin, registry, port, e.upstream, transport)
	})
}

// dpopReport renders the DPoP comparison as markdown: per route, the
// medians and the CPU per request against the static header and the
// bearer route.
func dpopReport(machine string, e *env, cases []*dpopCase, plain []round) string {
	var b strings.Builder
	b.WriteString("\n## DPoP: CPU per request of a DPoP route vs a bearer route vs Caddy with a static header\n\n")
	fmt.Fprintf(&b, "- machine: %s\n- method: wrk -t%d -c%d, one merchant on %s, tokens from the sandbox bank; %d interleaved rounds of %s per server after a %s warm-up; each server a separate process (CPU from /proc/PID/stat)\n\n",
		machine, e.o.threads, e.o.connections, benchPath, e.o.rounds, e.o.round, e.o.warmup)
	b.WriteString("| route | req/s | p99 | CPU per request | vs static header | vs bearer route | errors |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- |\n")
	p := summarize(plain)
	fmt.Fprintf(&b, "| Caddy, static header | %.0f | %s | %s | 1.00 | – | %d |\n", p.RPS, ms(p.P99), us(p.CPU), p.Errors)
	bearer := summarize(cases[0].rounds)
	for _, c := range cases {
		s := summarize(c.rounds)
		name := c.name
		if c.alg != "" {
			name += " " + c.alg
		}
		fmt.Fprintf(&b, "| %s | %.0f | %s | %s | %s | %s | %d |\n", name, s.RPS, ms(s.P99), us(s.CPU),
			ratioText(float64(s.CPU), float64(p.CPU)), ratioText(float64(s.CPU), float64(bearer.CPU)), s.Errors)
	}
	return b.String()
}
