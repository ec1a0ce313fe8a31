"""Ground floor: errors, campaign-id validation, the contract constants (format names, environment variables), the credential scrubber, progress lines and plots. Imports no other fleet package."""
