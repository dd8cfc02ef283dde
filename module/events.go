package module

import "go.uber.org/zap"

// emit is where the operator's view's events (opstate.Event*) leave the
// app. This placeholder logs them at debug level.
func (app *App) emit(event string, data map[string]any) {
	if app.logger == nil {
		return
	}
	app.logger.Debug("token broker event", zap.String("event", event), zap.Any("data", data))
}
