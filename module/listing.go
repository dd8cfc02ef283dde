package module

import (
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// listings are the organisation listings (package listing) kept across
// reloads with their list and schedule, keyed by provider ID and settings.
var listings = caddy.NewUsagePool()

// loadListing returns the pooled listing of the registry's wildcard
// entry, starting it if it is new, and the pool key to release; nil when
// the wildcard is not restricted.
func loadListing(reg *config.Registry, logger *zap.Logger) (*listing.Listing, string, error) {
	if reg == nil || reg.Wildcard == nil || !reg.Wildcard.OnlyListed {
		return nil, "", nil
	}
	p := reg.Providers[reg.Wildcard.Provider]
	lister, ok := p.Source.(listing.OrganisationLister)
	if !ok {
		return nil, "", fmt.Errorf("token_broker: %s: merchant \"*\": field only_listed_organisations: provider %q cannot list its organisations", reg.Path, p.Name)
	}
	key := fmt.Sprintf("organisations %s every=%s max=%d", p.ID, reg.Wildcard.OrganisationsRefresh, reg.Wildcard.MaxOrganisations)
	v, _, err := listings.LoadOrNew(key, func() (caddy.Destructor, error) {
		limits := nuapay.ListLimits{Organisations: reg.Wildcard.MaxOrganisations}
		l := listing.New(p.Name, lister, limits, reg.Wildcard.OrganisationsRefresh, logger)
		l.Start()
		return l, nil
	})
	if err != nil {
		return nil, "", err
	}
	v.(*listing.Listing).UseLister(lister) // the config loaded last: its key
	return v.(*listing.Listing), key, nil
}
