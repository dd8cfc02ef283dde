// Package command is the token broker's Caddy subcommands (`caddy
// token-broker health|validate|status|check|consent-link`, `caddy
// token-broker-refresh-token`): their cobra commands and flags, the
// admin API client, the registry checks and what they print. Package
// module registers them with Caddy's command services (Caddy).
package command

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// ErrFailed fails a command whose message was printed already: exit
// status 1, nothing more on the terminal.
var ErrFailed = errors.New("token-broker: failed")

// fail prints a command's failure on w, a line of format and args, and
// returns ErrFailed.
func fail(w io.Writer, format string, args ...any) error {
	fmt.Fprintf(w, format+"\n", args...)
	return ErrFailed
}

// AdminRequest sends a request to the admin API at addr and returns its
// answer; an answer other than 2xx is an error quoting its status ("HTTP
// 503") and body (caddycmd.AdminAPIRequest).
type AdminRequest func(addr, method, uri string, headers http.Header, body io.Reader) (*http.Response, error)

// IO are a command's streams.
type IO struct {
	// In is standard input.
	In io.Reader
	// Out is standard output.
	Out io.Writer
	// Err is standard error.
	Err io.Writer
}

// Health prints the health of the token broker at admin address addr
// (readiness, or liveness with live): one line, on Out when it is ready
// (live), else on Err with ErrFailed.
func Health(std IO, request AdminRequest, addr string, live bool) error {
	h, err := askHealth(request, addr, live)
	if err != nil {
		return fail(std.Err, "not ready: %v", err)
	}
	if !h.Passes(live) {
		return fail(std.Err, "%s", h.Reason)
	}
	if live {
		fmt.Fprintln(std.Out, "live: the token_broker app is running")
	} else {
		fmt.Fprintln(std.Out, h.Reason)
	}
	return nil
}

// askHealth gets the probe.Health from the admin API at addr. A 503
// carries it too (the admin API's refusal quotes the body).
func askHealth(request AdminRequest, addr string, live bool) (probe.Health, error) {
	uri := "/token_broker/health"
	if live {
		uri += "/live"
	}
	var h probe.Health
	err := askAdmin(request, addr, http.MethodGet, uri, nil, &h)
	if r, ok := errors.AsType[*refusal](err); ok && r.status == http.StatusServiceUnavailable {
		var unhealthy probe.Health
		if json.Unmarshal([]byte(r.body), &unhealthy) == nil && unhealthy.Reason != "" {
			return unhealthy, nil
		}
	}
	return h, err
}

// Validate loads the merchant registries that the JSON config cfg (read
// from file) names and prints their problems on Err, one per line,
// file:line first, and a line per valid registry on Out. expand resolves
// the placeholders of a registry path. It returns ErrFailed when a
// registry has problems or cfg names none.
func Validate(std IO, cfg []byte, file string, expand func(string) string) error {
	if file == "" {
		return fail(std.Err, "no config file: name one with --config, or run where a Caddyfile is")
	}
	paths, err := registryPaths(cfg)
	if err != nil {
		return fail(std.Err, "%s: %v", file, err)
	}
	if len(paths) == 0 {
		return fail(std.Err, "%s names no merchant registry: set `config <file.toml>` in the token_broker global option", file)
	}
	var invalid error
	for _, path := range paths {
		reg, err := config.LoadWith(expand(path), config.Options{RefreshStore: &oauth.MemoryStore{}})
		if err != nil {
			invalid = ErrFailed
			for _, line := range config.ErrorLines(err) {
				fmt.Fprintln(std.Err, line)
			}
			continue
		}
		fmt.Fprintf(std.Out, "%s: valid (%d merchants, %d providers)\n", path, len(reg.Merchants), len(reg.Providers))
	}
	return invalid
}

// RegistryError is the error of a merchant registry that did not load,
// as Caddy logs it: its problems one per line, each file:line first,
// after a line that counts them and names the command that prints them
// without the provisioning chain and the log's escapes around them.
func RegistryError(err error) error {
	n := len(config.ErrorLines(err))
	if n <= 1 {
		return fmt.Errorf("token_broker: %w", err)
	}
	return fmt.Errorf("token_broker: %d problems in the merchant registry, one per line below (`caddy token-broker validate --config <Caddyfile>` prints them alone):\n%w", n, err)
}

// registryPaths returns the merchant registries a JSON config names: the
// token_broker app's config and the token_broker handlers' own, each once,
// in the order found.
func registryPaths(cfg []byte) ([]string, error) {
	var doc any
	if err := json.Unmarshal(cfg, &doc); err != nil {
		return nil, fmt.Errorf("reading the adapted config: %v", err)
	}
	var paths []string
	add := func(p any) {
		if s, ok := p.(string); ok && s != "" && !slices.Contains(paths, s) {
			paths = append(paths, s)
		}
	}
	if m, ok := doc.(map[string]any); ok {
		if apps, ok := m["apps"].(map[string]any); ok {
			if tb, ok := apps["token_broker"].(map[string]any); ok {
				add(tb["config"])
			}
		}
	}
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "token_broker" {
				add(v["config"])
			}
			for _, k := range slices.Sorted(maps.Keys(v)) {
				walk(v[k])
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(doc)
	return paths, nil
}

// RefreshTokenUsage is the usage line of `caddy token-broker-refresh-token`.
const RefreshTokenUsage = "--merchant <id> [--address <admin address>]"

// RefreshTokenShort says in one line what `caddy
// token-broker-refresh-token` does.
const RefreshTokenShort = "Loads a merchant's refresh token into the running token broker"

// RefreshTokenLong is the help of `caddy token-broker-refresh-token`.
const RefreshTokenLong = `
Reads a merchant's OAuth refresh token (from an authorization-code consent)
on standard input and hands it to the running token broker through Caddy's
admin API. The broker keeps it in Caddy's storage and rotates it as the
provider requires. The token is never taken as an argument, so it does not
show in the process list or the shell history:

  printf '%s' "$REFRESH_TOKEN" | caddy token-broker-refresh-token --merchant acme
`

// RefreshTokenFlags adds the flags of `caddy token-broker-refresh-token`
// to cmd.
func RefreshTokenFlags(cmd *cobra.Command) {
	cmd.Flags().String("merchant", "", "the merchant whose refresh token this is")
	cmd.Flags().String("address", "", "the admin API address (default: Caddy's default admin address)")
}

// RefreshToken reads merchant's refresh token on In and loads it into the
// token broker at the admin address that address finds; it prints the
// answer on Out, and its error says in words what went wrong (askAdmin).
// merchant must be a valid merchant id.
func RefreshToken(std IO, request AdminRequest, address func() (string, error), merchant string) error {
	if merchant == "" {
		return errors.New("--merchant is required: the id of a merchant of the registry")
	}
	if !config.ValidMerchantID(merchant) {
		return fmt.Errorf("--merchant %q is not a merchant id (%s): give the id of a merchant of the registry", merchant, errcode.MerchantIDGrammar)
	}
	line, err := bufio.NewReader(io.LimitReader(std.In, 64<<10)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("reading the refresh token from standard input: %w", err)
	}
	rt := strings.TrimSpace(line)
	if rt == "" {
		return errors.New("no refresh token on standard input")
	}
	addr, err := address()
	if err != nil {
		return err
	}
	var answer json.RawMessage
	if err := askAdmin(request, addr, http.MethodPut, "/token_broker/merchants/"+merchant+"/refresh_token",
		map[string]string{"refresh_token": rt}, &answer); err != nil {
		return err
	}
	fmt.Fprintln(std.Out, string(answer))
	return nil
}
