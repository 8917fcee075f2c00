"""Small widgets of the app: the steps bar and the loss plot."""
