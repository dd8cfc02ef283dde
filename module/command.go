package module

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/tokenbroker/caddy-token-broker/broker/command"
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
		Usage: "health|status|check|consent-link|validate [flags]",
		Short: "Shows the running token broker's health and state, checks merchants, validates its merchant registries",
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

status prints the state of a running token broker (its admin API's
GET /token_broker/state) as tables: the providers (breaker, backoff, token
requests and failures of the last minutes, last error), the merchants
needing attention (refused, unknown organisation, needing consent, backing
off) and the merchants counted by state. --state lists the merchants in
one state instead, --provider keeps one provider's, --json prints the
report as JSON. It exits 1 when the instance cannot be asked.

  caddy token-broker status [--address <admin address>] [--provider <name>] [--state <state>] [--json]

check validates the config's merchant registries as validate does and,
given a merchant, has the running token broker make one real token request
for it (through its failure policy: a provider in backoff is not called)
and prints what the provider answered, never the token. It exits 1 when
the registries have problems or the token request fails.

  caddy token-broker check [MERCHANT] [--config <file>] [--adapter <name>] [--address <admin address>]

consent-link prints a one-time consent link for a merchant whose provider
uses consent (authorization code with a consent table), to send to the
merchant.

  caddy token-broker consent-link MERCHANT [--return-url <url>] [--address <admin address>]
`,
		CobraFunc: func(cmd *cobra.Command) {
			health := &cobra.Command{
				Use:   "health [--address <admin address>] [--live]",
				Short: "Exits 0 when the running token broker is ready (with --live: alive), 1 otherwise",
				Args:  cobra.NoArgs,
				RunE:  runHealth,
			}
			adminFlags(health)
			health.Flags().Bool("live", false, "check liveness (the token_broker app runs) instead of readiness")
			validate := &cobra.Command{
				Use:   "validate [--config <file>] [--adapter <name>]",
				Short: "Prints the problems of the config's merchant registries, one per line",
				Args:  cobra.NoArgs,
				RunE:  runValidate,
			}
			validate.Flags().StringP("config", "c", "", "the config file (default: ./Caddyfile)")
			validate.Flags().StringP("adapter", "a", "", "the name of the config adapter to use")
			status := &cobra.Command{
				Use:   "status [--address <admin address>] [--provider <name>] [--state <state>] [--json]",
				Short: "Prints the running token broker's providers, the merchants needing attention and the merchants by state",
				Args:  cobra.NoArgs,
				RunE:  runStatus,
			}
			adminFlags(status)
			status.Flags().String("provider", "", "show this provider's merchants only")
			status.Flags().String("state", "", "list the merchants in this state instead of those needing attention")
			status.Flags().Bool("json", false, "print the report as JSON")
			check := &cobra.Command{
				Use:   "check [MERCHANT] [--config <file>] [--adapter <name>] [--address <admin address>]",
				Short: "Validates the merchant registries; with a merchant, makes one token request for it and says what the provider answered",
				Args:  cobra.MaximumNArgs(1),
				RunE:  runCheck,
			}
			adminFlags(check)
			link := &cobra.Command{
				Use:   "consent-link MERCHANT [--return-url <url>] [--address <admin address>]",
				Short: "Prints a one-time consent link for a merchant",
				Args:  cobra.ExactArgs(1),
				RunE:  runConsentLink,
			}
			adminFlags(link)
			link.Flags().String("return-url", "", "where the merchant's browser goes after consent (on the provider's return_urls)")
			cmd.AddCommand(health, validate, status, check, link)
		},
	})
}

// adminFlags adds the flags that find the admin address (adminAddress)
// to cmd.
func adminFlags(cmd *cobra.Command) {
	cmd.Flags().String("address", "", "the admin API address (default: --config's admin address, else $CADDY_ADMIN or localhost:2019)")
	cmd.Flags().StringP("config", "c", "", "the config file whose admin address to use")
	cmd.Flags().StringP("adapter", "a", "", "the name of the config adapter to use")
}

// adminAddress is the admin address the flags of adminFlags name.
func adminAddress(fl caddycmd.Flags) (string, error) {
	return caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, fl.String("config"), fl.String("adapter"))
}

// silentFailure fails cmd with exit status 1 without cobra's "Error:" line
// or usage when err is command.ErrFailed (its message is printed).
func silentFailure(cmd *cobra.Command, err error) error {
	if errors.Is(err, command.ErrFailed) {
		cmd.SilenceErrors, cmd.SilenceUsage = true, true
	}
	return err
}

// stdio are the streams of cmd.
func stdio(cmd *cobra.Command) command.IO {
	return command.IO{In: os.Stdin, Out: cmd.OutOrStdout(), Err: cmd.ErrOrStderr()}
}

// runHealth is `caddy token-broker health` (command.Health).
func runHealth(cmd *cobra.Command, _ []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	addr, err := adminAddress(fl)
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "not ready: finding the admin address: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	return silentFailure(cmd, command.Health(stdio(cmd), caddycmd.AdminAPIRequest, addr, fl.Bool("live")))
}

// runStatus is `caddy token-broker status` (command.Status).
func runStatus(cmd *cobra.Command, _ []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	addr, err := adminAddress(fl)
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "finding the admin address: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	q := command.StatusQuery{Provider: fl.String("provider"), State: fl.String("state"), JSON: fl.Bool("json")}
	return silentFailure(cmd, command.Status(stdio(cmd), caddycmd.AdminAPIRequest, addr, q, time.Now()))
}

// runConsentLink is `caddy token-broker consent-link` (command.ConsentLink).
func runConsentLink(cmd *cobra.Command, args []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	addr, err := adminAddress(fl)
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "finding the admin address: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	return silentFailure(cmd, command.ConsentLink(stdio(cmd), caddycmd.AdminAPIRequest, addr, args[0], fl.String("return-url"), time.Now()))
}

// runCheck is `caddy token-broker check` (command.Check): the config is
// loaded as validate loads it.
func runCheck(cmd *cobra.Command, args []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	cfg, file, _, err := caddycmd.LoadConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "loading the config: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	merchant := ""
	if len(args) == 1 {
		merchant = args[0]
	}
	address := func() (string, error) {
		return caddycmd.DetermineAdminAPIAddress(fl.String("address"), cfg, "", "")
	}
	return silentFailure(cmd, command.Check(stdio(cmd), caddycmd.AdminAPIRequest, cfg, file, registryExpand, address, merchant))
}

// runValidate is `caddy token-broker validate` (command.Validate).
func runValidate(cmd *cobra.Command, _ []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	cfg, file, _, err := caddycmd.LoadConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "loading the config: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	return silentFailure(cmd, command.Validate(stdio(cmd), cfg, file, registryExpand))
}

// registryExpand resolves the placeholders of a registry path, as the
// app does (loadRegistry).
func registryExpand(path string) string { return caddy.NewReplacer().ReplaceKnown(path, "") }

// cmdRefreshToken is `caddy token-broker-refresh-token`
// (command.RefreshToken); a failure exits with status 1.
func cmdRefreshToken(fl caddycmd.Flags) (int, error) {
	merchant := fl.String("merchant")
	if !config.ValidMerchantID(merchant) {
		return 1, errors.New("--merchant is required: a merchant id of the registry")
	}
	address := func() (string, error) { return caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, "", "") }
	std := command.IO{In: os.Stdin, Out: os.Stdout, Err: os.Stderr}
	if err := command.RefreshToken(std, caddycmd.AdminAPIRequest, address, merchant); err != nil {
		return 1, err
	}
	return 0, nil
}
