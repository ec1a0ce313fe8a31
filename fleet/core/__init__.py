"""Ground floor: errors, campaign-id validation, the credential scrubber, progress lines and plots. Imports no other fleet package."""
