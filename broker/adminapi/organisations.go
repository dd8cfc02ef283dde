package adminapi

import (
	"context"
	"fmt"
	"net/http"

	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Organisations lists the organisations linked to the partner at the
// Nuapay provider name of reg, to find the encodedOrganisationId of a new
// merchant. The error is an *Error: 404 for a provider not in reg, 409
// for one that cannot list, 502 when the listing fails.
func Organisations(ctx context.Context, reg *config.Registry, name string) ([]nuapay.Organisation, error) {
	if reg == nil || reg.Providers[name] == nil {
		return nil, &Error{Status: http.StatusNotFound, Err: fmt.Errorf("provider %q is not in the registry", name)}
	}
	lister, ok := reg.Providers[name].Source.(listing.OrganisationLister)
	if !ok {
		return nil, &Error{Status: http.StatusConflict, Err: fmt.Errorf("provider %q is not a Nuapay provider", name)}
	}
	var orgs []nuapay.Organisation
	if err := lister.EachOrganisation(ctx, nuapay.ListLimits{}, func(o nuapay.Organisation) { orgs = append(orgs, o) }); err != nil {
		return nil, &Error{Status: http.StatusBadGateway, Err: fmt.Errorf("listing the organisations of %q: %w", name, err)}
	}
	return orgs, nil
}

// RefreshListing reads again now the organisations list l that restricts
// the wildcard merchant entry of provider name (nil: none) and returns
// how many organisations it holds. The error is an *Error: 405 when l is
// not name's, 502 when the listing fails (the last good list stays in
// force).
func RefreshListing(ctx context.Context, l *listing.Listing, name string) (int, error) {
	if l == nil || l.Provider() != name {
		return 0, &Error{Status: http.StatusMethodNotAllowed, Allow: http.MethodGet,
			Err: fmt.Errorf("method not allowed: use GET; POST refreshes the list of a provider that restricts the wildcard merchant entry (only_listed_organisations), which %q does not", name)}
	}
	n, err := l.Refresh(ctx)
	if err != nil {
		return 0, &Error{Status: http.StatusBadGateway,
			Err: fmt.Errorf("listing the organisations of %q: %w (the last good list stays in force)", name, err)}
	}
	return n, nil
}
