package opstate

import (
	"fmt"
	"net/url"
	"strconv"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// Page is one page of a list sorted by merchant id: the merchants whose
// id sorts after After, at most Limit of them. The admin lists that page
// (GET /token_broker/state, /tokens and /consent/merchants) read it from
// their after and limit parameters (ParsePage).
type Page struct {
	// After is the cursor: merchants whose id sorts after it (the Next of
	// the previous page); "" starts at the first.
	After string
	// Limit is the number of merchants of the page: default DefaultLimit,
	// at most MaxLimit.
	Limit int
}

// Page sizes.
const (
	DefaultLimit = 100
	MaxLimit     = 1000
)

// ParsePage reads a Page from the parameters after (a merchant id, the
// next of the previous page) and limit (1 to MaxLimit, default
// DefaultLimit) of v; other parameters are the caller's to check
// (CheckParams). A malformed one is an error that names it and says what
// is accepted.
func ParsePage(v url.Values) (Page, error) {
	p := Page{After: v.Get("after"), Limit: DefaultLimit}
	if p.After != "" && !config.ValidMerchantID(p.After) {
		return Page{}, fmt.Errorf("after %.130q is not a merchant id: pass the next of the previous page", p.After)
	}
	if s := v.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > MaxLimit {
			return Page{}, fmt.Errorf("limit %.64q: must be a whole number from 1 to %d", s, MaxLimit)
		}
		p.Limit = n
	}
	return p, nil
}

// size is the page's Limit, DefaultLimit when it is not positive and
// MaxLimit when above it.
func (p Page) size() int {
	if p.Limit <= 0 {
		return DefaultLimit
	}
	return min(p.Limit, MaxLimit)
}

// Cut returns the items of page p of items, which are sorted by the
// merchant id that id reads from each (several items may have the same
// merchant): every item of the first p.Limit merchants after p.After, so
// one merchant's items are never split across pages. next is the last
// merchant of the page when items of later merchants remain (the After
// of the next page), "" on the last page. items may already leave out the
// merchants up to p.After (a caller that filters before it sorts).
func Cut[T any](p Page, items []T, id func(T) string) (page []T, next string) {
	start := len(items)
	for i, it := range items {
		if id(it) > p.After {
			start = i
			break
		}
	}
	merchants, end := 0, start
	for end < len(items) {
		if end == start || id(items[end]) != id(items[end-1]) {
			if merchants == p.size() {
				return items[start:end], id(items[end-1])
			}
			merchants++
		}
		end++
	}
	return items[start:end], ""
}
