package command

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
)

// adminErrorRe matches the error of an admin answer other than 2xx
// (AdminRequest): its status and body.
var adminErrorRe = regexp.MustCompile(`(?s)HTTP (\d{3}): (.*)$`)

// askAdmin sends a request to the admin API at addr and decodes its JSON
// answer into v. Its error says what went wrong in words: the admin
// address unreachable, the token_broker app not running, or the admin
// API's own error message.
func askAdmin(request AdminRequest, addr, method, uri string, body any, v any) error {
	var rd io.Reader
	var h http.Header
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd, h = strings.NewReader(string(b)), http.Header{"Content-Type": {"application/json"}}
	}
	resp, err := request(addr, method, uri, h, rd)
	if err != nil {
		return adminError(addr, err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(v); err != nil {
		return fmt.Errorf("reading the answer of %s %s at admin address %s: %v", method, uri, addr, err)
	}
	return nil
}

// refusal is the admin API's answer other than 2xx: its HTTP status, its
// body as the request's error quotes it, and its error message.
type refusal struct {
	status int
	body   string
	err    error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// refusedWith reports whether err is the admin API's answer with status.
func refusedWith(err error, status int) bool {
	var r *refusal
	return errors.As(err, &r) && r.status == status
}

// adminError is the error of a failed admin request, in words: a
// *refusal when the admin API answered.
func adminError(addr string, err error) error {
	m := adminErrorRe.FindStringSubmatch(err.Error())
	if m == nil {
		return fmt.Errorf("cannot reach the admin API at %s (is Caddy running, and is this its admin address? --address names another): %v", addr, err)
	}
	body := strings.TrimSpace(m[2])
	msg := body
	var answer struct {
		Error string `json:"error"`
	}
	if json.Unmarshal([]byte(body), &answer) == nil && answer.Error != "" {
		msg = answer.Error
	}
	status, _ := strconv.Atoi(m[1])
	if strings.Contains(msg, "token_broker app is not running") {
		return &refusal{status, body, fmt.Errorf("the Caddy at admin address %s does not run the token_broker app: configure the token_broker global option", addr)}
	}
	return &refusal{status, body, fmt.Errorf("the token broker at admin address %s answered HTTP %d: %s", addr, status, msg)}
}
