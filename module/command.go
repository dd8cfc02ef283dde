package module

import (
	"errors"
	"fmt"
	"os"

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
	addr, err := caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, fl.String("config"), fl.String("adapter"))
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "not ready: finding the admin address: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	return silentFailure(cmd, command.Health(stdio(cmd), caddycmd.AdminAPIRequest, addr, fl.Bool("live")))
}

// runValidate is `caddy token-broker validate` (command.Validate).
func runValidate(cmd *cobra.Command, _ []string) error {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	cfg, file, _, err := caddycmd.LoadConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "loading the config: %v\n", err)
		return silentFailure(cmd, command.ErrFailed)
	}
	expand := func(path string) string { return caddy.NewReplacer().ReplaceKnown(path, "") }
	return silentFailure(cmd, command.Validate(stdio(cmd), cfg, file, expand))
}

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
