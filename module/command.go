package module

import (
	"errors"
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
		Usage: command.Usage,
		Short: command.Short,
		Long:  command.Long,
		CobraFunc: func(cmd *cobra.Command) {
			command.AddSubcommands(cmd, command.Caddy{
				Request:      caddycmd.AdminAPIRequest,
				AdminAddress: caddycmd.DetermineAdminAPIAddress,
				LoadConfig:   loadConfig,
				Expand:       registryExpand,
			})
		},
	})
}

// loadConfig is caddycmd.LoadConfig without the adapter's name.
func loadConfig(configFile, adapter string) ([]byte, string, error) {
	cfg, file, _, err := caddycmd.LoadConfig(configFile, adapter)
	return cfg, file, err
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
