package module

import (
	"os"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/tokenbroker/caddy-token-broker/broker/command"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "token-broker-refresh-token",
		Usage: command.RefreshTokenUsage,
		Short: command.RefreshTokenShort,
		Long:  command.RefreshTokenLong,
		CobraFunc: func(cmd *cobra.Command) {
			command.RefreshTokenFlags(cmd)
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
				LoadConfig:   caddycmd.LoadConfig,
				Expand:       registryExpand,
			})
		},
	})
}

// registryExpand resolves the placeholders of a registry path, as the
// app does (loadPooled).
func registryExpand(path string) string { return caddy.NewReplacer().ReplaceKnown(path, "") }

// cmdRefreshToken is `caddy token-broker-refresh-token`
// (command.RefreshToken); a failure exits with status 1.
func cmdRefreshToken(fl caddycmd.Flags) (int, error) {
	address := func() (string, error) { return caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, "", "") }
	std := command.IO{In: os.Stdin, Out: os.Stdout, Err: os.Stderr}
	if err := command.RefreshToken(std, caddycmd.AdminAPIRequest, address, fl.String("merchant")); err != nil {
		return 1, err
	}
	return 0, nil
}
