package command

import (
	"errors"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
)

// Caddy are the services of Caddy's command package that the commands
// use; package module gives caddycmd's.
type Caddy struct {
	// Request sends a request to the admin API (caddycmd.AdminAPIRequest).
	Request AdminRequest
	// AdminAddress finds the admin address: address when set, else the
	// admin address of cfg, or of configFile adapted with adapter, else
	// the default (caddycmd.DetermineAdminAPIAddress).
	AdminAddress func(address string, cfg []byte, configFile, adapter string) (string, error)
	// LoadConfig loads configFile (default ./Caddyfile), adapted with
	// adapter, as JSON; it returns the config, the file it read and the
	// adapter it used (caddycmd.LoadConfig).
	LoadConfig func(configFile, adapter string) (cfg []byte, file, adapterUsed string, err error)
	// Expand resolves the placeholders of a registry path, as the
	// token_broker app does.
	Expand func(path string) string
}

// Usage is the usage line of `caddy token-broker`.
const Usage = "health|status|check|consent-link|validate [flags]"

// Short says in one line what `caddy token-broker` does.
const Short = "Shows the running token broker's health and state, checks merchants, validates its merchant registries"

// Long is the help of `caddy token-broker`.
const Long = `
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

status prints the state of a running token broker (its admin API's
GET /token_broker/state) as tables: the providers (breaker, backoff, token
requests and failures of the last minutes, last error), the merchants
needing attention (refused, unknown organisation, needing consent, backing
off) and the merchants counted by state. --state lists the merchants in
one state instead, --provider keeps one provider's, --json prints the
report as JSON, a page of it (--after the next of the previous page,
--limit merchants at most). It exits 1 when the instance cannot be asked.

  caddy token-broker status [--address <admin address>] [--provider <name>] [--state <state>] [--json [--after <id>] [--limit <n>]]

check validates the config's merchant registries as validate does and,
given a merchant, has the running token broker make one real token request
for it (through its failure policy: a provider in backoff is not called)
and prints what the provider answered, never the token. It exits 1 when
the registries have problems or the token request fails.

  caddy token-broker check [MERCHANT] [--config <file>] [--adapter <name>] [--address <admin address>]

consent-link prints a consent link for a merchant whose provider uses
consent (authorization code with a consent table), to send to the
merchant. The link works until a consent started from it completes, or
it expires.

  caddy token-broker consent-link MERCHANT [--return-url <url>] [--address <admin address>]
`

// AddSubcommands adds the subcommands of `caddy token-broker` (health,
// validate, status, check, consent-link) to cmd, on the services c. A
// failure whose message was printed exits with status 1 without cobra's
// "Error:" line or usage.
func AddSubcommands(cmd *cobra.Command, c Caddy) {
	health := &cobra.Command{
		Use:   "health [--address <admin address>] [--live]",
		Short: "Exits 0 when the running token broker is ready (with --live: alive), 1 otherwise",
		Args:  cobra.NoArgs,
		RunE: withAdminAddress(c, "not ready: ", func(cmd *cobra.Command, _ []string, addr string) error {
			live, _ := cmd.Flags().GetBool("live")
			return Health(stdio(cmd), c.Request, addr, live)
		}),
	}
	adminFlags(health)
	health.Flags().Bool("live", false, "check liveness (the token_broker app runs) instead of readiness")
	validate := &cobra.Command{
		Use:   "validate [--config <file>] [--adapter <name>]",
		Short: "Prints the problems of the config's merchant registries, one per line",
		Args:  cobra.NoArgs,
		RunE: silent(func(cmd *cobra.Command, _ []string) error {
			cfg, file, err := loadConfig(cmd, c)
			if err != nil {
				return err
			}
			return Validate(stdio(cmd), cfg, file, c.Expand)
		}),
	}
	validate.Flags().StringP("config", "c", "", "the config file (default: ./Caddyfile)")
	validate.Flags().StringP("adapter", "a", "", "the name of the config adapter to use")
	status := &cobra.Command{
		Use:   "status [--address <admin address>] [--provider <name>] [--state <state>] [--json [--after <id>] [--limit <n>]]",
		Short: "Prints the running token broker's providers, the merchants needing attention and the merchants by state",
		Args:  cobra.NoArgs,
		RunE: withAdminAddress(c, "", func(cmd *cobra.Command, _ []string, addr string) error {
			var q StatusQuery
			q.Provider, _ = cmd.Flags().GetString("provider")
			q.State, _ = cmd.Flags().GetString("state")
			q.JSON, _ = cmd.Flags().GetBool("json")
			q.After, _ = cmd.Flags().GetString("after")
			q.Limit, _ = cmd.Flags().GetInt("limit")
			if (q.After != "" || q.Limit != 0) && !q.JSON {
				return fail(cmd.ErrOrStderr(), "--after and --limit choose the page of --json: add --json")
			}
			if q.Limit < 0 || q.Limit > opstate.MaxLimit {
				return fail(cmd.ErrOrStderr(), "--limit %d: want a number of merchants from 1 to %d, or no --limit for %d", q.Limit, opstate.MaxLimit, opstate.DefaultLimit)
			}
			return Status(stdio(cmd), c.Request, addr, q, time.Now())
		}),
	}
	adminFlags(status)
	status.Flags().String("provider", "", "show this provider's merchants only")
	status.Flags().String("state", "", "list the merchants in this state instead of those needing attention")
	status.Flags().Bool("json", false, "print the report as JSON")
	status.Flags().String("after", "", "with --json: the merchants after this id (the next of the previous page)")
	status.Flags().Int("limit", 0, "with --json: at most this many merchants (default 100, at most 1000)")
	check := &cobra.Command{
		Use:   "check [MERCHANT] [--config <file>] [--adapter <name>] [--address <admin address>]",
		Short: "Validates the merchant registries; with a merchant, makes one token request for it and says what the provider answered",
		Args:  cobra.MaximumNArgs(1),
		RunE: silent(func(cmd *cobra.Command, args []string) error {
			cfg, file, err := loadConfig(cmd, c)
			if err != nil {
				return err
			}
			merchant := ""
			if len(args) == 1 {
				merchant = args[0]
			}
			address := func() (string, error) {
				flag, _ := cmd.Flags().GetString("address")
				return c.AdminAddress(flag, cfg, "", "")
			}
			return Check(stdio(cmd), c.Request, cfg, file, c.Expand, address, merchant)
		}),
	}
	adminFlags(check)
	link := &cobra.Command{
		Use:   "consent-link MERCHANT [--return-url <url>] [--address <admin address>]",
		Short: "Prints a consent link for a merchant",
		Args:  cobra.ExactArgs(1),
		RunE: withAdminAddress(c, "", func(cmd *cobra.Command, args []string, addr string) error {
			returnURL, _ := cmd.Flags().GetString("return-url")
			return ConsentLink(stdio(cmd), c.Request, addr, args[0], returnURL, time.Now())
		}),
	}
	adminFlags(link)
	link.Flags().String("return-url", "", "where the merchant's browser goes after consent (on the provider's return_urls)")
	cmd.AddCommand(health, validate, status, check, link)
}

// adminFlags adds the flags that find the admin address
// (withAdminAddress) to cmd.
func adminFlags(cmd *cobra.Command) {
	cmd.Flags().String("address", "", "the admin API address (default: --config's admin address, else $CADDY_ADMIN or localhost:2019)")
	cmd.Flags().StringP("config", "c", "", "the config file whose admin address to use")
	cmd.Flags().StringP("adapter", "a", "", "the name of the config adapter to use")
}

// withAdminAddress is the RunE of a subcommand that asks the running
// token broker: run is called with the admin address that the flags of
// adminFlags name; when it cannot be found, why is printed on standard
// error after prefix and the subcommand exits 1 (silent).
func withAdminAddress(c Caddy, prefix string, run func(cmd *cobra.Command, args []string, addr string) error) func(cmd *cobra.Command, args []string) error {
	return silent(func(cmd *cobra.Command, args []string) error {
		address, _ := cmd.Flags().GetString("address")
		config, _ := cmd.Flags().GetString("config")
		adapter, _ := cmd.Flags().GetString("adapter")
		addr, err := c.AdminAddress(address, nil, config, adapter)
		if err != nil {
			return fail(cmd.ErrOrStderr(), "%sfinding the admin address: %v", prefix, err)
		}
		return run(cmd, args, addr)
	})
}

// loadConfig loads the config that the --config and --adapter flags
// name. When it cannot, it prints why on standard error and returns
// ErrFailed.
func loadConfig(cmd *cobra.Command, c Caddy) ([]byte, string, error) {
	config, _ := cmd.Flags().GetString("config")
	adapter, _ := cmd.Flags().GetString("adapter")
	cfg, file, _, err := c.LoadConfig(config, adapter)
	if err != nil {
		return nil, "", fail(cmd.ErrOrStderr(), "loading the config: %v", err)
	}
	return cfg, file, nil
}

// silent is run, whose failure exits with status 1 without cobra's
// "Error:" line or usage when it is ErrFailed (its message is printed).
func silent(run func(cmd *cobra.Command, args []string) error) func(cmd *cobra.Command, args []string) error {
	return func(cmd *cobra.Command, args []string) error {
		err := run(cmd, args)
		if errors.Is(err, ErrFailed) {
			cmd.SilenceErrors, cmd.SilenceUsage = true, true
		}
		return err
	}
}

// stdio are the streams of cmd.
func stdio(cmd *cobra.Command) IO {
	return IO{In: os.Stdin, Out: cmd.OutOrStdout(), Err: cmd.ErrOrStderr()}
}
