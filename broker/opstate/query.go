package opstate

import (
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
)

// ParseQuery reads a Query from the parameters of GET /token_broker/state:
// provider, state (one of States), and the page's after and limit
// (ParsePage). An unknown, repeated or malformed parameter is an error
// that says which and what is accepted.
func ParseQuery(v url.Values) (Query, error) {
	if err := CheckParams(v, "provider", "state", "after", "limit"); err != nil {
		return Query{}, err
	}
	q := Query{Provider: v.Get("provider"), State: v.Get("state")}
	if q.State != "" && !slices.Contains(States(), q.State) {
		return Query{}, fmt.Errorf("state %.64q is not a merchant state: use one of %s", q.State, strings.Join(States(), ", "))
	}
	page, err := ParsePage(v)
	if err != nil {
		return Query{}, err
	}
	q.Page = page
	return q, nil
}

// CheckParams returns an error naming the first parameter of v, in name
// order, that is not one of names or that is given more than once, and
// what to do. The name it quotes is cut to 64 characters.
func CheckParams(v url.Values, names ...string) error {
	for _, name := range slices.Sorted(maps.Keys(v)) {
		if !slices.Contains(names, name) {
			return fmt.Errorf("unknown parameter %.64q: use %s", name, strings.Join(names, ", "))
		}
		if n := len(v[name]); n > 1 {
			return fmt.Errorf("parameter %.64q is given %d times: give it once", name, n)
		}
	}
	return nil
}
