package module

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/config"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "token-broker-refresh-token",
		Usage: "--merchant <id> [--address <admin address>]",
		Short: "Loads a merchant's refresh token into the running token broker",
		Long: `
Reads a merchant's OAuth refresh token (from an authorization-code consent)
on standard input and hands it to the running token broker through Caddy's
admin API. The broker keeps it in Caddy's storage and rotates it as the
provider requires. The token is never taken as an argument, so it does not
show in the process list or the shell history:

  printf '%s' "$REFRESH_TOKEN" | caddy token-broker-refresh-token --merchant acme
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().String("merchant", "", "the merchant whose refresh token this is")
			cmd.Flags().String("address", "", "the admin API address (default: Caddy's default admin address)")
			cmd.RunE = caddycmd.WrapCommandFuncForCobra(cmdRefreshToken)
		},
	})
}

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "token-broker",
		Usage: "health|validate [flags]",
		Short: "Checks the running token broker's health, or validates its merchant registries",
		Long: `
health asks a running Caddy, through its admin API, whether the token
broker is ready (every merchant registry loaded, and the organisations list
read where the wildcard entry is restricted to it) or, with --live, alive.
It prints one line and exits 0 when it is, 1 when it is not: fit for an
exec probe. A failing provider is reported but does not make it unready.

  caddy token-broker health [--address <admin address>] [--live]

validate reads the merchant registries a config names (the token_broker
global option's config and the handlers' own) and prints their problems
one per line, file:line first, with nothing else on the line. It exits 0
when there are none, 1 otherwise.

  caddy token-broker validate [--config <file>] [--adapter <name>]
`,
		CobraFunc: func(cmd *cobra.Command) {
			health := &cobra.Command{
				Use:   "health [--address <admin address>] [--live]",
				Short: "Exits 0 when the running token broker is ready (with --live: alive), 1 otherwise",
				Args:  cobra.NoArgs,
				RunE:  runHealth,
			}
			health.Flags().String("address", "", "the admin API address (default: --config's admin address, else $CADDY_ADMIN or localhost:2019)")
			health.Flags().StringP("config", "c", "", "the config file whose admin address to use")
			health.Flags().StringP("adapter", "a", "", "the name of the config adapter to use")
			health.Flags().Bool("live", false, "check liveness (the token_broker app runs) instead of readiness")
			validate := &cobra.Command{
				Use:   "validate [--config <file>] [--adapter <name>]",
				Short: "Prints the problems of the config's merchant registries, one per line",
				Args:  cobra.NoArgs,
				RunE:  runValidate,
			}
			validate.Flags().StringP("config", "c", "", "the config file (default: ./Caddyfile)")
			validate.Flags().StringP("adapter", "a", "", "the name of the config adapter to use")
			cmd.AddCommand(health, validate)
		},
	})
}

// errSilent fails a command whose message was printed already: exit
// status 1, nothing more on the terminal.
var errSilent = errors.New("token-broker: failed")

// silentFailure fails cmd with exit status 1 without cobra's "Error:" line
// or usage.
func silentFailure(cmd *cobra.Command) error {
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	return errSilent
}

// runHealth is `caddy token-broker health`.
func runHealth(cmd *cobra.Command, _ []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	live := fl.Bool("live")
	addr, err := caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, fl.String("config"), fl.String("adapter"))
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "not ready: finding the admin address: %v\n", err)
		return silentFailure(cmd)
	}
	h, err := askHealth(addr, live)
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "not ready: %v\n", err)
		return silentFailure(cmd)
	}
	ok := h.Ready
	if live {
		ok = h.Live
	}
	if !ok {
		fmt.Fprintln(cmd.ErrOrStderr(), h.Reason)
		return silentFailure(cmd)
	}
	if live {
		fmt.Fprintln(cmd.OutOrStdout(), "live: the token_broker app is running")
	} else {
		fmt.Fprintln(cmd.OutOrStdout(), h.Reason)
	}
	return nil
}

// askHealth gets the probe.Health from the admin API at addr. A 503 carries it
// too (caddycmd.AdminAPIRequest turns it into an error quoting the body).
func askHealth(addr string, live bool) (probe.Health, error) {
	uri := "/token_broker/health"
	if live {
		uri += "/live"
	}
	var h probe.Health
	resp, err := caddycmd.AdminAPIRequest(addr, http.MethodGet, uri, nil, nil)
	if err != nil {
		msg := err.Error()
		if i := strings.IndexByte(msg, '{'); i >= 0 && strings.Contains(msg, "HTTP 503") && json.Unmarshal([]byte(msg[i:]), &h) == nil && h.Reason != "" {
			return h, nil
		}
		return h, fmt.Errorf("asking the token broker at admin address %s: %v", addr, err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&h); err != nil {
		return h, fmt.Errorf("reading the health answer of admin address %s: %v", addr, err)
	}
	return h, nil
}

// runValidate is `caddy token-broker validate`.
func runValidate(cmd *cobra.Command, _ []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	cfg, file, _, err := caddycmd.LoadConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "loading the config: %v\n", err)
		return silentFailure(cmd)
	}
	if file == "" {
		fmt.Fprintln(cmd.ErrOrStderr(), "no config file: name one with --config, or run where a Caddyfile is")
		return silentFailure(cmd)
	}
	paths, err := registryPaths(cfg)
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "%s: %v\n", file, err)
		return silentFailure(cmd)
	}
	if len(paths) == 0 {
		fmt.Fprintf(cmd.ErrOrStderr(), "%s names no merchant registry: set `config <file.toml>` in the token_broker global option\n", file)
		return silentFailure(cmd)
	}
	failed := false
	for _, path := range paths {
		reg, err := config.LoadWith(caddy.NewReplacer().ReplaceKnown(path, ""),
			config.Options{RefreshStore: oauth.NewMemoryStore()})
		if err != nil {
			failed = true
			for _, line := range config.ErrorLines(err) {
				fmt.Fprintln(cmd.ErrOrStderr(), line)
			}
			continue
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s: valid (%d merchants, %d providers)\n", path, len(reg.Merchants), len(reg.Providers))
	}
	if failed {
		return silentFailure(cmd)
	}
	return nil
}

// registryError is the error of a merchant registry that did not load,
// as Caddy logs it: its problems one per line, each file:line first,
// after a line that counts them and names the command that prints them
// without the provisioning chain and the log's escapes around them.
func registryError(err error) error {
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

func cmdRefreshToken(fl caddycmd.Flags) (int, error) {
	merchant := fl.String("merchant")
	if !config.ValidMerchantID(merchant) {
		return fail1(errors.New("--merchant is required: a merchant id of the registry"))
	}
	line, err := bufio.NewReader(io.LimitReader(os.Stdin, 64<<10)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fail1(fmt.Errorf("reading the refresh token from standard input: %w", err))
	}
	rt := strings.TrimSpace(line)
	if rt == "" {
		return fail1(errors.New("no refresh token on standard input"))
	}
	body, _ := json.Marshal(map[string]string{"refresh_token": rt})
	addr, err := caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, "", "")
	if err != nil {
		return fail1(err)
	}
	resp, err := caddycmd.AdminAPIRequest(addr, http.MethodPut,
		"/token_broker/merchants/"+merchant+"/refresh_token", http.Header{"Content-Type": {"application/json"}}, strings.NewReader(string(body)))
	if err != nil {
		return fail1(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	fmt.Println(strings.TrimSpace(string(out)))
	return 0, nil
}

// fail1 is a failed command: exit status 1.
func fail1(err error) (int, error) { return 1, err }
