package module

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

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
	resp, err := caddycmd.AdminAPIRequest(fl.String("address"), http.MethodPut,
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
